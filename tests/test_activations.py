"""The streaming activation pass against brute force over a small corpus (tiny model), and from_residuals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saesteer.activations import (
    HIST_EDGES,
    _Accumulator,
    _batches,
    activation_pass,
    encode_topk,
    from_residuals,
    iter_residual_shards,
)
from saesteer.steering import capture_residuals
from saesteer.testing import make_tiny_sae

TOP_N, WINDOW, AFTER = 5, 6, 2


def _corpus(lm, n: int = 23, seed: int = 0, ragged: bool = True) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    vocab = len(lm.tokenizer)
    bos = lm.tokenizer.bos_token_id
    words = [i for i in range(4, vocab)]  # no special tokens
    lengths = rng.integers(4, 20, n) if ragged else np.full(n, 16)
    return [[bos, *rng.choice(words, int(m) - 1).tolist()] for m in lengths]


def _brute_force(lm, sae, seqs):
    """Every activation of every token, one sequence per forward: the obvious computation."""
    bos = lm.tokenizer.bos_token_id
    d = sae.width
    fire = np.zeros(d, np.int64)
    mx = np.zeros(d, np.float32)
    hist = np.zeros((d, len(HIST_EDGES) - 1), np.int64)
    per_seq = []  # (max per feature, argmax per feature, acts (P, d))
    n_tokens = 0
    for s in seqs:
        ids = torch.tensor([s])
        with torch.no_grad(), capture_residuals(lm, [sae.layer]) as resid:
            lm.model(input_ids=ids)
            acts = sae.sae.encode(resid[sae.layer][0]).numpy()  # (P, d)
        acts[np.array(s) == bos] = 0.0
        n_tokens += int((np.array(s) != bos).sum())
        fire += (acts > 0).sum(0)
        mx = np.maximum(mx, acts.max(0))
        for f in range(d):
            v = acts[:, f][acts[:, f] > 0]
            idx = np.clip(np.searchsorted(HIST_EDGES[1:-1], v, side="right"), 0, len(HIST_EDGES) - 2)
            np.add.at(hist[f], idx, 1)
        per_seq.append((acts.max(0), acts.argmax(0), acts))
    return n_tokens, fire, mx, hist, per_seq


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_streaming_pass_equals_brute_force(tiny_lm, arch):
    sae = make_tiny_sae(arch=arch, seed=4)
    seqs = _corpus(tiny_lm)
    [stats] = activation_pass(tiny_lm, [sae], seqs, batch_size=4, top_n=TOP_N, window=WINDOW, after=AFTER)
    n_tokens, fire, mx, hist, per_seq = _brute_force(tiny_lm, sae, seqs)

    assert stats.n_tokens == n_tokens and stats.n_sequences == len(seqs)
    np.testing.assert_array_equal(stats.fire_count, fire)
    np.testing.assert_allclose(stats.density, fire / n_tokens)
    np.testing.assert_allclose(stats.max_activation, mx, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.hist_counts, hist)
    assert stats.hist_counts.sum() == fire.sum()

    seq_max = np.stack([m for m, _, _ in per_seq])  # (n_seq, d)
    checked_windows = 0
    for f in range(sae.width):
        expected = [i for i in np.argsort(-seq_max[:, f], kind="stable") if seq_max[i, f] > 0][:TOP_N]
        assert stats.n_contexts[f] == len(expected)
        np.testing.assert_allclose(stats.top_acts[f, : len(expected)], seq_max[expected, f], rtol=1e-5)
        # sequences that start with the same token tie exactly, so check what each slot claims, not the order
        order = stats.top_seq[f, : len(expected)].tolist()
        assert len(set(order)) == len(order)
        np.testing.assert_allclose(seq_max[order, f], stats.top_acts[f, : len(expected)], rtol=1e-5)
        assert (stats.top_seq[f, len(order):] == -1).all() and (stats.win_tokens[f, len(order):] == -1).all()
        for slot, i in enumerate(order):
            _, arg, acts = per_seq[i]
            p = int(arg[f])
            assert stats.top_pos[f, slot] == p and stats.top_token[f, slot] == seqs[i][p]
            start = int(stats.win_start[f, slot])
            assert start <= p < start + WINDOW
            assert start == max(0, min(p - (WINDOW - 1 - AFTER), len(seqs[i]) - WINDOW))
            for j in range(WINDOW):
                q = start + j
                tok = seqs[i][q] if q < len(seqs[i]) and seqs[i][q] != tiny_lm.tokenizer.bos_token_id else -1
                assert stats.win_tokens[f, slot, j] == tok
                expected = acts[q, f] if q < len(seqs[i]) else 0.0
                # padded batch vs one sequence per forward: float32 rounding differs by ~1e-6 absolute
                assert stats.win_acts[f, slot, j] == pytest.approx(expected, rel=1e-4, abs=1e-5)
            checked_windows += 1
    assert checked_windows > sae.width  # the buffers filled and were merged across batches


@pytest.mark.parametrize("d_sae,k", [(128, 8), (16, 8)])  # window lookup among the k entries; dense fallback
def test_topk_sparse_update_equals_the_dense_update(tiny_lm, d_sae, k):
    """The TopK fast path (the k kept entries per token, never a dense matrix) leaves every statistic exactly
    as the dense path over ``sae.encode`` does. With d_sae=16 the first batches have so many entering
    candidates that the window lookup takes its dense fallback."""
    sae = make_tiny_sae(d_sae=d_sae, k=k, seed=9)
    seqs = _corpus(tiny_lm, n=23)
    tok = tiny_lm.tokenizer
    dense_acc = _Accumulator(d_sae, TOP_N, WINDOW, AFTER, torch.device("cpu"))
    sparse_acc = _Accumulator(d_sae, TOP_N, WINDOW, AFTER, torch.device("cpu"))
    for ids, mask, labels, first in _batches(seqs, 4, None, tok.bos_token_id, tok.pad_token_id or 0):
        with torch.no_grad(), capture_residuals(tiny_lm, [sae.layer]) as resid:
            tiny_lm.model(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            values, indices = encode_topk(sae, resid[sae.layer])
            dense = sae.sae.encode(resid[sae.layer])
        assert torch.equal(torch.zeros_like(dense).scatter_(-1, indices, values), dense)
        seq_ids = torch.arange(first, first + len(ids))
        dense_acc.update(dense, labels, seq_ids)
        sparse_acc.update_topk(values, indices, labels, seq_ids)
    for name in ("n_tokens", "n_sequences"):
        assert getattr(dense_acc, name) == getattr(sparse_acc, name)
    for name in ("fire", "max", "hist", "acts", "seq", "pos", "tok", "start", "win_tok", "win_act"):
        assert torch.equal(getattr(dense_acc, name), getattr(sparse_acc, name)), name
    assert encode_topk(make_tiny_sae(arch="standard"), resid[sae.layer]) is None  # other architectures: dense


def test_pass_stops_after_n_tokens(tiny_lm, tiny_sae):
    seqs = _corpus(tiny_lm)
    [stats] = activation_pass(tiny_lm, [tiny_sae], seqs, n_tokens=50, batch_size=3)
    assert stats.n_tokens == 50
    [full] = activation_pass(tiny_lm, [tiny_sae], seqs, batch_size=3)
    assert full.n_tokens == sum(len(s) - 1 for s in seqs)


def test_several_saes_in_one_pass_equal_separate_passes(tiny_lm):
    saes = [make_tiny_sae(layer=1, seed=5), make_tiny_sae(layer=3, arch="standard", seed=6)]
    seqs = _corpus(tiny_lm, seed=1)
    together = activation_pass(tiny_lm, saes, seqs, batch_size=5, top_n=TOP_N, window=WINDOW, after=AFTER)
    for sae, joint in zip(saes, together):
        [alone] = activation_pass(tiny_lm, [sae], seqs, batch_size=5, top_n=TOP_N, window=WINDOW, after=AFTER)
        assert joint.layer == sae.layer
        for name in ("fire_count", "top_seq", "top_pos", "win_tokens", "hist_counts"):
            np.testing.assert_array_equal(getattr(joint, name), getattr(alone, name))
        np.testing.assert_allclose(joint.win_acts, alone.win_acts, rtol=1e-6)


def _residual_batches(lm, seqs, layers, batch):
    """Residuals as bundle.collect_activations_from_ids stores them: BOS column dropped, flattened (B·(P−1), d)."""
    for i in range(0, len(seqs), batch):
        ids = torch.tensor(seqs[i : i + batch])
        with torch.no_grad(), capture_residuals(lm, layers) as resid:
            lm.model(input_ids=ids)
        yield ids.numpy().astype(np.int32), {l: resid[l][:, 1:].reshape(-1, lm.d_model).numpy() for l in layers}


def test_from_residuals_equals_model_pass(tiny_lm):
    saes = [make_tiny_sae(layer=2, seed=7), make_tiny_sae(layer=1, arch="standard", seed=8)]
    seqs = _corpus(tiny_lm, n=20, seed=2, ragged=False)
    kw = {"top_n": TOP_N, "window": WINDOW, "after": AFTER}
    model = activation_pass(tiny_lm, saes, seqs, batch_size=4, **kw)
    cached = from_residuals(saes, _residual_batches(tiny_lm, seqs, [1, 2], 4), tiny_lm.tokenizer.bos_token_id, **kw)
    for a, b in zip(model, cached):
        assert a.n_tokens == b.n_tokens and a.n_sequences == b.n_sequences
        for name in ("fire_count", "top_seq", "top_pos", "top_token", "win_start", "win_tokens", "hist_counts"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        for name in ("max_activation", "top_acts", "win_acts"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6, err_msg=name)
    limited = from_residuals(saes[:1], _residual_batches(tiny_lm, seqs, [1, 2], 4), tiny_lm.tokenizer.bos_token_id, n_tokens=70, **kw)
    assert limited[0].n_tokens == 70


def test_iter_residual_shards_reads_the_bundle_layout(tmp_path, tiny_lm):
    sae = make_tiny_sae(layer=2, seed=9)
    seqs = _corpus(tiny_lm, n=12, seed=3, ragged=False)
    for i, (ids, resid) in enumerate(_residual_batches(tiny_lm, seqs, [2], 4)):
        (tmp_path / "token_ids").mkdir(exist_ok=True)
        (tmp_path / "L2").mkdir(exist_ok=True)
        np.save(tmp_path / "token_ids" / f"{i:05d}.npy", ids)
        np.save(tmp_path / "L2" / f"{i:05d}.npy", resid[2])
    np.save(tmp_path / "token_ids" / "00099.npy", ids)  # a shard whose residuals were never written: ignored
    [a] = activation_pass(tiny_lm, [sae], seqs, batch_size=4)
    [b] = from_residuals([sae], iter_residual_shards(tmp_path, [2]), tiny_lm.tokenizer.bos_token_id)
    np.testing.assert_array_equal(a.top_seq, b.top_seq)
    np.testing.assert_array_equal(a.fire_count, b.fire_count)


def test_bad_inputs_are_refused(tiny_lm, tiny_sae):
    with pytest.raises(ValueError, match="at least one"):
        activation_pass(tiny_lm, [], [[1, 2]])
    with pytest.raises(ValueError, match="after < window"):
        activation_pass(tiny_lm, [tiny_sae], [[2, 5, 6]], window=4, after=4)
    with pytest.raises(ValueError, match="do not match"):
        from_residuals([tiny_sae], [(np.zeros((2, 5), np.int32), {2: np.zeros((3, 5, 64), np.float32)})], 2)


def test_feature_data_from_precomputed_residuals_equals_the_model_pass(tmp_path, tiny_lm):
    """compute_many with ``residuals`` (the bundle's cached shards) gives the same feature data under the same
    cache key as its own model pass, and refuses residuals of other text."""
    from saesteer.features import compute_many
    from saesteer.store import Store

    sae = make_tiny_sae(layer=2, seed=7)
    seqs = _corpus(tiny_lm, n=12, seed=3, ragged=False)
    kw = {"n_tokens": None, "use_bundled": False, "batch_sequences": 4}
    [a] = compute_many(tiny_lm, [sae], seqs, store=Store(tmp_path / "a"), **kw)
    [b] = compute_many(tiny_lm, [sae], seqs, store=Store(tmp_path / "b"), residuals=lambda: _residual_batches(tiny_lm, seqs, [2], 4), **kw)
    assert a.meta["key"] == b.meta["key"]
    np.testing.assert_array_equal(a.table["density"].to_numpy(), b.table["density"].to_numpy())
    np.testing.assert_allclose(a.table["input_score"].to_numpy(), b.table["input_score"].to_numpy(), equal_nan=True)
    np.testing.assert_allclose(a.table["max_activation"].to_numpy(), b.table["max_activation"].to_numpy(), rtol=1e-5)
    other = _corpus(tiny_lm, n=12, seed=4, ragged=False)
    with pytest.raises(ValueError, match="do not match the corpus"):
        compute_many(tiny_lm, [sae], seqs, store=Store(tmp_path / "c"), residuals=lambda: _residual_batches(tiny_lm, other, [2], 4), **kw)
    with pytest.raises(ValueError, match="cover 8 of the corpus' 12"):
        compute_many(tiny_lm, [sae], seqs, store=Store(tmp_path / "d"), residuals=lambda: _residual_batches(tiny_lm, seqs[:8], [2], 4), **kw)
