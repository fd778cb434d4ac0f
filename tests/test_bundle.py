"""The bundle pipeline end to end on a tiny model, and the shipped SAEs against their manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import WORDS, make_tiny_model

from saesteer.bundle import build_bundle, reconstruction_metrics, tokenize_corpus
from saesteer.config import TrainParams
from saesteer.corpus import Doc
from saesteer.saes import list_bundled


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
