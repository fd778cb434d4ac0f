"""The bundle pipeline end to end on a tiny model, and the shipped SAEs against their manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saesteer.bundle import build_bundle, reconstruction_metrics, tokenize_corpus
from saesteer.config import TrainParams
from saesteer.corpus import Doc
from saesteer.saes import list_bundled
from saesteer.testing import WORDS, make_tiny_model


def _docs(n: int, seed: int = 0) -> list[Doc]:
    rng = np.random.default_rng(seed)
    return [Doc(" ".join(rng.choice(WORDS[:80], size=60)), "synthetic") for _ in range(n)]


def test_build_bundle_end_to_end(tmp_path):
    lm = make_tiny_model(n_layers=3, d_model=64)
    params = TrainParams(layers=(0, 2), width=128, k=8, tokens=4000, epochs=6.0, context_size=32, batch_size=128,
                         lr=3e-3, heldout_tokens=1000)
    train = tokenize_corpus(lm.tokenizer, _docs(120), params.tokens, params.context_size)
    held = tokenize_corpus(lm.tokenizer, _docs(30, seed=1), params.heldout_tokens, params.context_size)
    out = tmp_path / "saes"
    manifest = build_bundle(lm, params, train, held, out, tmp_path / "work", corpus_id="synthetic", ce_sequences=8)

    assert [e["layer"] for e in manifest["saes"]] == [0, 2]
    assert manifest["token_visits_per_sae"] >= params.tokens
    for entry in manifest["saes"]:
        from sae_lens import SAE

        sae = SAE.load_from_disk(str(out / entry["dir"]))
        assert sae.cfg.d_sae == 128 and sae.cfg.d_in == 64
        assert sae.cfg.metadata.hook_name == entry["hook"] == f"blocks.{entry['layer']}.hook_resid_post"
        m = entry["metrics"]
        assert 0 < m["l0"] <= 8 + 1e-6
        assert m["fve"] > 0.3, m  # a trained SAE reconstructs far better than chance on this toy data
        assert 0 <= m["dead_fraction"] <= 1
        assert np.isfinite(m["ce_loss_recovered"])
    assert json.loads((out / "manifest.json").read_text())["corpus"] == "synthetic"


def test_reconstruction_metrics_by_hand():
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=4, d_sae=4))
    with torch.no_grad():  # identity SAE on non-negative inputs: perfect reconstruction
        sae.W_enc.copy_(torch.eye(4)); sae.W_dec.copy_(torch.eye(4)); sae.b_enc.zero_(); sae.b_dec.zero_()
    x = torch.rand(100, 4)
    x[:, 3] = 0  # feature 3 never fires
    m = reconstruction_metrics(sae, x)
    assert m["fve"] == pytest.approx(1.0)
    assert m["dead_fraction"] == pytest.approx(0.25)
    assert m["l0"] == pytest.approx(float((x != 0).sum(1).float().mean()))


@pytest.mark.parametrize("entry", list_bundled(), ids=lambda e: e["id"])
def test_bundled_sae_matches_manifest(entry):
    from sae_lens import SAE

    sae = SAE.load_from_disk(entry["path"])
    assert sae.cfg.d_sae == entry["width"] >= 4096
    assert sae.cfg.d_in == 640
    assert sae.cfg.metadata.hook_name == entry["hook"]


def test_at_least_six_bundled_layers():
    layers = [e["layer"] for e in list_bundled()]
    if not layers:
        pytest.fail("no bundled SAEs under assets/saes/gemma-3-270m")
    assert len(layers) >= 6 and min(layers) <= 3 and max(layers) >= 15


def _shipped_topk(d_in: int = 16, d_sae: int = 32, k: int = 4, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.5)
    return sae


def _training_topk(d_in: int = 16, d_sae: int = 32, k: int = 4):
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, normalize_activations="none"))


def test_init_from_shipped_reproduces_the_shipped_latents_on_raw_input():
    """Centred, rescaled input with b_dec = 0 and the adjusted b_enc: after folding scale and centre back, the
    new SAE encodes raw residuals exactly as the shipped one; the decoder bias is now the centre."""
    from saesteer.bundle import centring_stats, init_from_shipped

    shipped = _shipped_topk()
    x = torch.randn(500, 16) + 40 * torch.ones(16)  # a large shared part, as Gemma's residual has
    centre, scale = centring_stats(x)
    sae = _training_topk()
    init_from_shipped(sae, shipped, centre, scale, torch.zeros(32, dtype=torch.bool), seed=0)
    with torch.no_grad():
        a_centred = sae.encode((x - centre) * scale)
        assert torch.allclose(a_centred / scale, shipped.encode(x), atol=1e-4)
        sae.fold_activation_norm_scaling_factor(scale)
        sae.b_dec += centre
        assert torch.allclose(sae.encode(x), shipped.encode(x), atol=1e-4)
        assert torch.allclose(sae.b_dec, centre, atol=1e-5)
        a = shipped.encode(x)
        assert torch.allclose(sae.decode(a), shipped.decode(a) - shipped.b_dec + centre, atol=1e-3)
    assert scale == pytest.approx(4.0 / float((x - centre).norm(dim=1).mean()), rel=1e-5)


def test_init_from_shipped_reinitialises_only_the_dense_latents():
    from saesteer.bundle import centring_stats, init_from_shipped

    shipped = _shipped_topk()
    x = torch.randn(200, 16)
    centre, scale = centring_stats(x)
    dense = torch.zeros(32, dtype=torch.bool)
    dense[[3, 7]] = True
    sae = _training_topk()
    init_from_shipped(sae, shipped, centre, scale, dense, seed=1)
    keep = ~dense
    assert torch.equal(sae.W_dec[keep], shipped.W_dec[keep]) and torch.equal(sae.W_enc[:, keep], shipped.W_enc[:, keep])
    assert torch.allclose(sae.W_dec[dense].norm(dim=1), torch.full((2,), 0.1))
    assert torch.equal(sae.W_enc[:, dense], sae.W_dec[dense].T) and torch.all(sae.b_enc[dense] == 0)


def _shared_plus_atoms(seed: int, d: int = 16, n_atoms: int = 24, n: int = 6000):
    """Toy residuals: a large shared vector (Gemma 3's massive dimensions in miniature) plus about three of
    ``n_atoms`` unit atoms per token. Returns (x, atoms, shared)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    shared = 30 * torch.ones(d) / d ** 0.5
    codes = (torch.rand(n, n_atoms, generator=g) < 3 / n_atoms) * torch.rand(n, n_atoms, generator=g) * 3
    return shared + codes @ atoms, atoms, shared


def test_finetune_moves_the_shared_part_into_the_bias(tmp_path):
    """A planted bias-like latent (decoder along the shared direction, always firing) is re-initialised and the
    fine-tuned SAE's peak latent is a sparse one, with the shared direction in b_dec."""
    from saesteer.bundle import finetune_saes, latent_density
    from saesteer.diagnostics import diagnose
    from saesteer.saes import LoadedSae

    x, atoms, shared = _shared_plus_atoms(seed=0)
    d, n_atoms, n = x.shape[1], len(atoms), len(x)
    shipped = _shipped_topk(d_in=d, d_sae=32, k=4)
    with torch.no_grad():  # latent 0 carries the shared part at every token; the others are the atoms, whose
        shipped.W_dec[:n_atoms] = atoms  # encoder bias cancels the shared part, as a trained SAE's does
        shipped.W_enc[:, :n_atoms] = atoms.T
        shipped.b_enc[:n_atoms] = -(shared @ atoms.T)
        shipped.b_enc[n_atoms:] = -100  # the spare latents start silent
        shipped.W_dec[0] = shared / shared.norm()
        shipped.W_enc[:, 0] = shared / shared.norm()
        shipped.b_dec.zero_()
    assert float(latent_density(shipped, x)[0]) == 1.0
    params = TrainParams(layers=(1,), width=32, k=4, tokens=n, epochs=4.0, context_size=32, batch_size=256, lr=3e-3)
    trained, info = finetune_saes(lambda layer: x.clone(), {1: shipped}, params, tmp_path, "toy", density_tokens=n)
    assert info[1]["reinitialised_latents"] == [0]
    sae = trained[1]
    diag = diagnose(LoadedSae(sae=sae, id="toy", hook_name="blocks.1.hook_resid_post", layer=1), x)
    assert diag.peak_is_dense < 0.1 and diag.n_dense == 0, diag
    assert torch.allclose(sae.b_dec.float(), shared, atol=0.5)  # the point the sparse codes are added to
    before = diagnose(LoadedSae(sae=shipped, id="toy0", hook_name="blocks.1.hook_resid_post", layer=1), x)
    assert before.peak_is_dense == 1.0 and before.dense_latents[0].latent == 0
    assert (tmp_path / "L1-topk4-w32" / "cfg.json").exists()


def test_training_from_scratch_on_centred_residuals_keeps_the_shared_part_in_the_bias(tmp_path):
    """``shipped[L] = None`` trains from sae-lens' random TopK init on the same centred residuals: no latent is
    dense, the shared direction ends in b_dec, and the info says the layer was not initialised from a shipped SAE."""
    from saesteer.bundle import finetune_saes, reconstruction_metrics
    from saesteer.diagnostics import diagnose
    from saesteer.saes import LoadedSae

    x, _, shared = _shared_plus_atoms(seed=1)
    n = len(x)
    params = TrainParams(layers=(1,), width=32, k=4, tokens=n, epochs=6.0, context_size=32, batch_size=256, lr=3e-3)
    trained, info = finetune_saes(lambda layer: x.clone(), {1: None}, params, tmp_path, "toy", density_tokens=n)
    assert info[1]["init"].endswith("(from scratch)") and info[1]["reinitialised_latents"] == []
    sae = trained[1]
    diag = diagnose(LoadedSae(sae=sae, id="toy", hook_name="blocks.1.hook_resid_post", layer=1), x)
    assert diag.n_dense == 0 and diag.peak_is_dense < 0.1, diag
    assert torch.allclose(sae.b_dec.float(), shared, atol=0.5)
    assert reconstruction_metrics(sae, x)["fve"] > 0.5  # it learned the atoms, not only the centre
