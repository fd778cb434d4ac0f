"""Logit lens, output score and input score against slow, obvious implementations; the ``scores`` CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from saesteer import scores
from saesteer.config import ScoreParams
from saesteer.scores import (
    LogitLens,
    input_scores,
    logit_lens,
    output_score_reference,
    output_scores,
)
from saesteer.testing import make_tiny_model, make_tiny_sae

RTOL = 1e-5


@pytest.fixture(scope="module")
def capped_lm():
    return make_tiny_model(softcap=30.0)


def _check_against_reference(lm, sae, params, features):
    got = output_scores(lm, sae, params, features=features)
    min_ranks = []
    for i, f in enumerate(features):
        ref = output_score_reference(lm, sae, int(f), params)
        np.testing.assert_array_equal(got.token_ids[i], ref.token_ids)
        assert got.score[i] == pytest.approx(ref.score, rel=RTOL)
        assert got.max_prob[i] == pytest.approx(ref.max_prob, rel=RTOL)
        assert got.min_rank[i] == ref.min_rank
        np.testing.assert_array_equal(got.ranks[i], np.minimum(ref.ranks, got.rank_cap))
        np.testing.assert_allclose(got.probs[i], ref.probs, rtol=RTOL, atol=1e-9)
        min_ranks.append(ref.min_rank)
    return got, min_ranks


@pytest.mark.parametrize("arch", ["topk", "standard"])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("amp", [10.0, 0.05])
def test_output_scores_equal_reference(tiny_lm, capped_lm, arch, softcap, amp):
    lm = capped_lm if softcap else tiny_lm
    sae = make_tiny_sae(arch=arch, seed=1 if arch == "standard" else 0)
    params = ScoreParams(amp=amp, batch_size=7)  # several batches, the last one partial
    features = np.arange(0, sae.width, 9)
    got, min_ranks = _check_against_reference(lm, sae, params, features)
    assert np.all((got.score >= 0) & (got.score <= 1))
    if amp < 1:  # a weak push leaves the T-tokens at varied ranks: the rank term is exercised
        assert max(min_ranks) > 0


def test_rank_cap_keeps_best_rank_exact(tiny_lm, tiny_sae):
    params = ScoreParams(amp=0.05, batch_size=16)
    features = np.arange(0, tiny_sae.width, 11)
    capped = output_scores(tiny_lm, tiny_sae, params, features=features, rank_cap=3)
    for i, f in enumerate(features):
        ref = output_score_reference(tiny_lm, tiny_sae, int(f), params)
        assert capped.min_rank[i] == ref.min_rank  # exact even when >= the cap
        np.testing.assert_array_equal(capped.ranks[i], np.minimum(ref.ranks, 3))
        assert capped.score[i] == pytest.approx(ref.score, rel=RTOL)
    assert (capped.min_rank >= 3).any()


@pytest.mark.parametrize("n_far", [1, 6, 8])  # rows past the cap need no top-cap logits; all of them: none at all
def test_ranks_and_probs_equal_brute_force(n_far):
    torch.manual_seed(n_far)
    logits = torch.randn(8, 5000)
    order = logits.argsort(dim=1, descending=True)
    far, near = torch.tensor([50, 900, 3000, 4999]), torch.tensor([300, 7, 2000, 20])
    # rows < n_far: every T-token ranked >= 50 (beyond the cap); the others: the best one at rank 7
    t_ids = torch.stack([order[row, far if row < n_far else near] for row in range(8)])
    ranks, probs, min_rank = scores._ranks_and_probs(logits, t_ids, cap=20)
    p = torch.softmax(logits.double(), dim=1)
    for row in range(8):
        exact = torch.tensor([(logits[row] > logits[row, t]).sum() for t in t_ids[row]])
        np.testing.assert_array_equal(ranks[row].numpy(), np.minimum(exact.numpy(), 20))
        assert min_rank[row].item() == exact.min().item()
        np.testing.assert_allclose(probs[row].numpy(), p[row, t_ids[row]].numpy(), rtol=1e-5)
    assert (min_rank[:n_far] == 50).all() and (min_rank[n_far:] == 7).all()


def test_output_scores_subset_equals_full(tiny_lm, tiny_sae):
    params = ScoreParams(amp=0.5, batch_size=32)
    full = output_scores(tiny_lm, tiny_sae, params)
    sub = [5, 77, 3]
    part = output_scores(tiny_lm, tiny_sae, params, features=sub)
    np.testing.assert_allclose(part.score, full.score[sub], rtol=1e-6)
    np.testing.assert_array_equal(part.min_rank, full.min_rank[sub])


def test_added_activation_is_amp_times_max(tiny_lm, tiny_sae):
    from saesteer.steering import capture_residuals

    ids = scores.prompt_ids(tiny_lm, ScoreParams().prompt)
    assert ids[0, 0].item() == tiny_lm.tokenizer.bos_token_id and (ids[0, 1:] != tiny_lm.tokenizer.bos_token_id).all()
    with torch.no_grad(), capture_residuals(tiny_lm, [tiny_sae.layer]) as acts:
        tiny_lm.model(input_ids=ids)
    expected = 3.0 * tiny_sae.sae.encode(acts[tiny_sae.layer][:, -1]).max().item()
    got = output_scores(tiny_lm, tiny_sae, ScoreParams(amp=3.0), features=[0])
    assert got.added_activation == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_logit_lens_equals_direct_softmax(tiny_lm, capped_lm, softcap):
    lm = capped_lm if softcap else tiny_lm
    sae = make_tiny_sae(arch="standard", seed=2)
    k = 10
    lens = logit_lens(lm, sae, k=k, batch=37)
    w_dec = sae.sae.W_dec.detach()
    for f in range(0, sae.width, 5):
        with torch.no_grad():
            logits = lm.model.lm_head(lm.model.model.norm(w_dec[f]))
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            probs = torch.softmax(logits.double(), dim=-1)  # the full softmax the fast path avoids
        top = probs.topk(k)
        bottom = probs.topk(k, largest=False)
        np.testing.assert_array_equal(lens.top_ids[f], top.indices.numpy())
        np.testing.assert_array_equal(lens.bottom_ids[f], bottom.indices.numpy())
        np.testing.assert_allclose(lens.top_logits[f], logits[top.indices].numpy(), rtol=1e-5, atol=1e-6)


def test_logit_lens_uses_sae_directions_for_rescaled_decoders(tiny_lm):
    """A TopK SAE with rescale_acts_by_decoder_norm decodes with W_dec[f]/|W_dec[f]|: the lens follows decode."""
    sae = make_tiny_sae(arch="topk", seed=3)
    sae.sae.cfg.rescale_acts_by_decoder_norm = True
    with torch.no_grad():
        sae.sae.W_dec.mul_(torch.linspace(0.1, 5.0, sae.width)[:, None])
    lens = logit_lens(tiny_lm, sae, k=5)
    for f in (0, 50, 127):
        unit = sae.sae.W_dec[f] / sae.sae.W_dec[f].norm()
        expected = tiny_lm.unembed(unit[None])[0].topk(5).indices.numpy()
        np.testing.assert_array_equal(lens.top_ids[f], expected)


def test_token_strings_make_whitespace_visible(tiny_lm):
    class Tok:
        def batch_decode(self, seqs):
            return [{1: " Paris", 2: "\n\n", 3: "\ufffd", 4: "a\tb"}[s[0]] for s in seqs]

        def convert_ids_to_tokens(self, ids):
            return [f"<0x{i:02X}>" for i in ids]

    class LM:
        tokenizer = Tok()

    assert scores.token_strings(LM(), [1, 2, 3, 4, 1]) == [" Paris", "↵↵", "<0x03>", "a⇥b", " Paris"]
    assert scores.token_strings(LM(), [1], mark_spaces=True) == ["␣Paris"]
    real = scores.token_strings(tiny_lm, [tiny_lm.tokenizer.convert_tokens_to_ids("paris")])
    assert real == ["paris"]


def test_input_scores_equal_direct_count():
    rng = np.random.default_rng(0)
    n, slots, k = 40, 120, 5
    top_ids = rng.integers(0, 30, (n, k))
    lens = LogitLens(np.arange(n), top_ids, np.zeros((n, k), np.float32), top_ids, np.zeros((n, k), np.float32))
    max_tok = rng.integers(0, 30, (n, slots)).astype(np.int32)
    n_ctx = rng.integers(0, slots + 1, n)
    n_ctx[:3] = [0, 9, 10]
    max_tok[np.arange(slots)[None, :] >= n_ctx[:, None]] = -1
    got = input_scores(max_tok, n_ctx, lens)
    for f in range(n):
        used = min(n_ctx[f], 100)
        if used < 10:
            assert math.isnan(got[f])
            continue
        hits = sum(int(max_tok[f, i]) in set(top_ids[f].tolist()) for i in range(used))
        assert got[f] == pytest.approx(hits / used)
    assert math.isnan(got[0]) and math.isnan(got[1]) and not math.isnan(got[2])


@pytest.mark.slow
def test_output_scores_equal_reference_on_embedded_model(embedded_lm):
    """In float64 the two paths agree to 1e-9: the batched one is exact. In float32 on this model the noise
    floor is far above 1e-5: merely running the reference forward with 3 identical batch rows instead of 1
    moves probabilities by ~1.4e-5 relative, and the KV-cache path differs by up to ~8e-5 (measured), so float32
    is held to 5e-4."""
    import copy

    from saesteer.config import SaeSpec
    from saesteer.models import LoadedModel
    from saesteer.saes import LoadedSae, list_bundled, load_sae

    bundled = list_bundled()
    if bundled:
        sae = load_sae(SaeSpec(source="bundled", sae_id=bundled[0]["id"]), embedded_lm)
        features = np.linspace(0, sae.width - 1, 8).astype(int)
    else:
        # Random weights, NOT a trained SAE: only the arithmetic of the two paths is being compared.
        from sae_lens import StandardSAE, StandardSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        torch.manual_seed(0)
        raw = StandardSAE(StandardSAEConfig(d_in=embedded_lm.d_model, d_sae=64, metadata=SAEMetadata(hook_name="blocks.6.hook_resid_post")))
        with torch.no_grad():
            raw.W_enc.normal_(0, embedded_lm.d_model**-0.5)
            raw.W_dec.copy_(torch.nn.functional.normalize(torch.randn_like(raw.W_dec), dim=-1))
            raw.b_enc.fill_(0.1)
        sae = LoadedSae(sae=raw, id="random-L6", hook_name="blocks.6.hook_resid_post", layer=6)
        features = np.arange(8)
    params = ScoreParams(batch_size=8)

    lm64 = LoadedModel(copy.deepcopy(embedded_lm.model).double(), embedded_lm.tokenizer, embedded_lm.name, embedded_lm.device, torch.float64)
    sae64 = LoadedSae(copy.deepcopy(sae.sae).double(), sae.id, sae.hook_name, sae.layer)
    got64 = output_scores(lm64, sae64, params, features=features)
    for i, f in enumerate(features):
        ref = output_score_reference(lm64, sae64, int(f), params)
        np.testing.assert_array_equal(got64.token_ids[i], ref.token_ids)
        assert got64.min_rank[i] == ref.min_rank
        assert got64.score[i] == pytest.approx(ref.score, rel=1e-9)
    del lm64, sae64

    got = output_scores(embedded_lm, sae, params, features=features)
    for i, f in enumerate(features):
        ref = output_score_reference(embedded_lm, sae, int(f), params)
        assert got.score[i] == pytest.approx(ref.score, rel=5e-4)
        assert abs(int(got.min_rank[i]) - ref.min_rank) <= 2  # near-tied logits may swap under fp32 noise


# ---------------------------------------------------------------------------------------------------
# CLI (a tiny model and SAE saved to local directories; no network, no real model)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_lm, tiny_sae):
    from saesteer.testing import WORDS

    root = tmp_path_factory.mktemp("tiny")
    tiny_lm.model.save_pretrained(root / "model")
    tiny_lm.tokenizer.save_pretrained(root / "model")
    tiny_sae.sae.save_model(str(root / "sae"))
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 30)) for _ in range(60)]
    (root / "corpus.txt").write_text("\n\n".join(lines))
    return root


def _cli(argv, monkeypatch, tmp_path):
    from saesteer.__main__ import main

    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    return main(["scores", *argv])


def test_cli_writes_one_row_per_feature(tiny_dirs, tmp_path, monkeypatch, tiny_lm, tiny_sae):
    out = tmp_path / "scores.csv"
    argv = ["--model", str(tiny_dirs / "model"), "--sae", str(tiny_dirs / "sae"), "--corpus", str(tiny_dirs / "corpus.txt"),
            "--tokens", "600", "--context-size", "32", "--out", str(out)]
    assert _cli(argv, monkeypatch, tmp_path) == 0
    table = pd.read_csv(out)
    assert len(table) == tiny_sae.width
    for col in ("feature", "output_score", "input_score", "density", "max_activation", "top_tokens"):
        assert col in table.columns
    assert table["density"].notna().all() and table["output_score"].notna().all()
    expected = output_scores(tiny_lm, tiny_sae, ScoreParams(), features=[0, 9])
    np.testing.assert_allclose(table["output_score"].to_numpy()[[0, 9]], expected.score, rtol=1e-5)

    only = tmp_path / "only.parquet"
    argv = ["--model", str(tiny_dirs / "model"), "--sae", str(tiny_dirs / "sae"), "--features", "1,4-6", "--only", "output",
            "--no-cache", "--out", str(only)]
    assert _cli(argv, monkeypatch, tmp_path) == 0
    part = pd.read_parquet(only)
    assert part["feature"].tolist() == [1, 4, 5, 6]
    assert part["input_score"].isna().all() and part["density"].isna().all()
    np.testing.assert_allclose(part["output_score"], table["output_score"].to_numpy()[[1, 4, 5, 6]], rtol=1e-6)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--features", "1,x"], "--features"),
        (["--features", "100000"], "out of range"),
        (["--out", "scores.txt"], ".csv or .parquet"),
        (["--tokens", "0"], "--tokens"),
        (["--corpus", "/nonexistent/file.txt"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(tiny_dirs, tmp_path, monkeypatch, capsys, extra, needle):
    argv = ["--model", str(tiny_dirs / "model"), "--sae", str(tiny_dirs / "sae"), "--no-cache", *extra]
    assert _cli(argv, monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # model loading may draw a progress bar above
    assert err.startswith("error: ") and needle in err


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("shape,k", [((6, 256 * 200), 20), ((3, 256 * 160), 20), ((4, 1000), 5), ((5, 256 * 8 * 30), 30)])
def test_topk_rows_equals_topk(shape, k, largest):
    """The group screen gives topk's values exactly (same order) and the same indices wherever values differ;
    rounded values make exact ties, where any of the tied indices is right."""
    torch.manual_seed(k)
    x = torch.randn(*shape)
    x[0] = torch.round(x[0] * 4) / 4  # many exact ties in one row
    x[1, 7] = x[1, 300] = x[1].max() + 1 if largest else x[1].min() - 1  # a tie at the very top
    values, idx = scores.topk_rows(x, k, largest=largest)
    ref_values, ref_idx = x.topk(k, dim=1, largest=largest)
    assert torch.equal(values, ref_values)
    assert torch.equal(x.gather(1, idx), values)  # each index points at its value
    assert all(len(set(r.tolist())) == k for r in idx)  # k distinct entries
    untied = torch.ones_like(x[:, :k], dtype=torch.bool)
    for r in range(shape[0]):
        counts = {v: int((x[r] == v).sum()) for v in values[r].tolist()}
        untied[r] = torch.tensor([counts[v] == 1 for v in values[r].tolist()])
    assert torch.equal(idx[untied], ref_idx[untied])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_greater_equals_brute_force(dtype):
    torch.manual_seed(1)
    x = torch.round(torch.randn(70, 3000, dtype=dtype) * 8) / 8  # ties with the threshold
    x[3, :5] = float("nan")
    t = x[:, :1].clone()
    t[5] = float("inf")
    t[6] = -float("inf")
    got = scores.count_greater(x, t, block=16)
    assert torch.equal(got, (x > t).sum(dim=1))
