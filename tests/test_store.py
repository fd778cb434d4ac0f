"""The on-disk cache: atomic writes, damaged files recomputed, read-only fallback, per-chunk resume; and
FeatureData persistence through it."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from saesteer import features as features_mod
from saesteer import store as store_mod
from saesteer.config import ScoreParams
from saesteer.features import FeatureData, FeatureDataError, compute_many
from saesteer.store import Store
from saesteer.testing import make_tiny_sae


def _arrays():
    return {"a": np.arange(10, dtype=np.float32), "b": np.ones((10, 3), np.int32)}


def test_round_trip_and_atomic_write(tmp_path):
    s = Store(tmp_path)
    assert s.save_arrays("k", "x.npz", _arrays())
    assert s.save_table("k", "t.parquet", pd.DataFrame({"f": [1, 2], "s": ["a", "b"]}))
    got = s.load_arrays("k", "x.npz")
    np.testing.assert_array_equal(got["a"], _arrays()["a"])
    assert s.load_table("k", "t.parquet")["s"].tolist() == ["a", "b"]
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.endswith(".tmp")]


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    s = Store(tmp_path)
    s.save_arrays("k", "x.npz", _arrays())
    before = (tmp_path / "k" / "x.npz").read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        s.save_arrays("k", "x.npz", {"a": np.zeros(3)})
    monkeypatch.undo()
    assert (tmp_path / "k" / "x.npz").read_bytes() == before
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.endswith(".tmp")]
    np.testing.assert_array_equal(s.load_arrays("k", "x.npz")["a"], _arrays()["a"])


def test_corrupted_file_is_recomputed(tmp_path):
    s = Store(tmp_path)
    calls = []

    def compute(start, stop):
        calls.append(start)
        return {"v": np.arange(start, stop, dtype=np.float64)}

    first = s.chunked("k", "c", 10, 4, compute)
    assert calls == [0, 4, 8]
    path = tmp_path / "k" / "c" / "00000004-00000008.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    path.write_bytes(bytes(data))
    assert s.load_arrays("k", "c/00000004-00000008.npz") is None
    calls.clear()
    again = s.chunked("k", "c", 10, 4, compute)
    assert calls == [4]
    np.testing.assert_array_equal(again["v"], first["v"])


def test_truncated_parquet_and_missing_sidecar_are_recomputed(tmp_path):
    s = Store(tmp_path)
    frame = pd.DataFrame({"x": np.arange(1000)})
    s.save_table("k", "t.parquet", frame)
    path = tmp_path / "k" / "t.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert s.load_table("k", "t.parquet") is None
    assert not path.exists()  # the damaged file is removed so that it is rewritten
    s.save_table("k", "t.parquet", frame)
    os.remove(tmp_path / "k" / "t.parquet.sum.json")  # a data file without its sidecar: a partial write
    assert s.load_table("k", "t.parquet") is None


def test_a_verified_file_that_does_not_parse_is_recomputed(tmp_path):
    s = Store(tmp_path)
    store_mod.atomic_write_bytes(tmp_path / "k" / "x.npz", b"not an npz file")
    assert s.load_arrays("k", "x.npz") is None


def test_unwritable_root_falls_back_to_computing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    roots = [blocker / "cache"]  # fails even for root
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        roots.append(ro)
    for root in roots:
        s = Store(root)
        with pytest.warns(RuntimeWarning, match="not writable"):
            got = s.chunked("k", "c", 5, 2, lambda a, b: {"v": np.arange(a, b)})
        np.testing.assert_array_equal(got["v"], np.arange(5))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not again
            assert not s.save_arrays("k", "x.npz", _arrays())


def test_disabled_store_reads_and_writes_nothing(tmp_path):
    Store(tmp_path).save_arrays("k", "x.npz", _arrays())
    off = Store(tmp_path, enabled=False)
    assert off.load_arrays("k", "x.npz") is None
    assert not off.save_arrays("k", "y.npz", _arrays())
    assert not (tmp_path / "k" / "y.npz").exists()


def test_fingerprints_follow_the_weights(tiny_lm):
    a = make_tiny_sae(seed=0)
    b = make_tiny_sae(seed=0)
    assert store_mod.sae_fingerprint(a) == store_mod.sae_fingerprint(b)
    with torch.no_grad():
        b.sae.W_dec[3, 5] += 1e-3
    assert store_mod.sae_fingerprint(a) != store_mod.sae_fingerprint(b)
    before = store_mod.model_fingerprint(tiny_lm)
    assert store_mod.model_fingerprint(tiny_lm) == before
    w = tiny_lm.model.model.norm.weight
    with torch.no_grad():
        w[0] += 1.0
        changed = store_mod.model_fingerprint(tiny_lm)
        w[0] -= 1.0
    assert changed != before
    assert store_mod.tokens_fingerprint([[1, 2], [3]]) != store_mod.tokens_fingerprint([[1], [2, 3]])


def test_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path))
    assert store_mod.default_root() == tmp_path / "features"


# ---------------------------------------------------------------------------------------------------
# compute_many through the store


def _corpus(lm, n=16, seed=0):
    rng = np.random.default_rng(seed)
    bos = lm.tokenizer.bos_token_id
    return [[bos, *rng.integers(4, len(lm.tokenizer), 15).tolist()] for _ in range(n)]


def _frames_equal(a: FeatureData, b: FeatureData):
    pd.testing.assert_frame_equal(a.table, b.table)
    for name in ("hist_counts", "ctx_act", "ctx_seq", "ctx_pos", "ctx_tokens", "ctx_acts", "ctx_start", "out_ranks", "out_probs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.lens.top_ids, b.lens.top_ids)


def test_resume_per_chunk_equals_uninterrupted_run(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setattr(features_mod, "OUTPUT_CHUNK", 32)
    sae = make_tiny_sae(seed=11)
    params = ScoreParams(amp=0.5, batch_size=16)
    full = compute_many(tiny_lm, [sae], None, params, only="output", cache=False)[0]

    s = Store(tmp_path)

    class Stop(Exception):
        pass

    def interrupt(stage, done, total):
        if stage.startswith("output") and done >= 64:
            raise Stop

    with pytest.raises(Stop):
        compute_many(tiny_lm, [sae], None, params, only="output", store=s, progress=interrupt)
    saved = sorted(p.name for p in tmp_path.rglob("output/*.npz"))
    assert saved == ["00000000-00000032.npz", "00000032-00000064.npz"]

    calls = []
    real = features_mod.output_scores

    def counting(*args, **kwargs):
        calls.append(kwargs["features"].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(features_mod, "output_scores", counting)
    resumed = compute_many(tiny_lm, [sae], None, params, only="output", store=s)[0]
    assert [c[0] for c in calls] == [64, 96]  # only the missing chunks
    np.testing.assert_array_equal(resumed.table["output_score"].to_numpy(), full.table["output_score"].to_numpy())
    np.testing.assert_array_equal(resumed.out_ranks, full.out_ranks)

    calls.clear()
    subset = compute_many(tiny_lm, [sae], None, params, only="output", store=s, features=[70, 3])[0]
    assert calls == []  # read from the cached chunks
    np.testing.assert_array_equal(subset.table["output_score"].to_numpy(), full.table["output_score"].to_numpy()[[70, 3]])


def test_second_run_reads_the_cache_and_save_load_round_trips(tiny_lm, tmp_path, monkeypatch):
    sae = make_tiny_sae(seed=12, arch="standard")
    seqs = _corpus(tiny_lm)
    s = Store(tmp_path / "cache")
    first = compute_many(tiny_lm, [sae], seqs, ScoreParams(batch_size=64), n_tokens=150, store=s, use_bundled=False)[0]
    assert first.table["n_contexts"].max() > 0 and first.meta["n_tokens"] == 150

    def fail(*a, **k):
        raise AssertionError("recomputed although cached")

    for name in ("activation_pass", "output_scores", "logit_lens"):
        monkeypatch.setattr(features_mod, name, fail)
    second = compute_many(tiny_lm, [sae], seqs, ScoreParams(batch_size=64), n_tokens=150, store=s, use_bundled=False)[0]
    _frames_equal(first, second)

    out = first.save(tmp_path / "saved")
    loaded = FeatureData.load(out)
    _frames_equal(first, loaded)
    assert loaded.meta == first.meta
    f = int(first.table.sort_values("n_contexts").feature.iloc[-1])
    assert [c.tokens for c in loaded.contexts(f)] == [c.tokens for c in first.contexts(f)]
    pd.testing.assert_frame_equal(loaded.output_details(f), first.output_details(f))

    (out / "arrays.npz").write_bytes((out / "arrays.npz").read_bytes()[:100])
    with pytest.raises(FeatureDataError, match="damaged"):
        FeatureData.load(out)


def test_feature_data_accessors(tiny_lm):
    sae = make_tiny_sae(seed=13)
    seqs = _corpus(tiny_lm, n=30, seed=1)
    data = features_mod.compute_feature_data(tiny_lm, sae, seqs, ScoreParams(batch_size=64), n_tokens=None, cache=False)
    table = data.table
    assert list(table.columns[:6]) == ["feature", "output_score", "input_score", "density", "max_activation", "top_tokens"]
    assert len(table) == sae.width
    f = int(table.sort_values("n_contexts").feature.iloc[-1])
    ctx = data.contexts(f)
    assert len(ctx) == table.n_contexts[f] > 0
    assert [c.activation for c in ctx] == sorted((c.activation for c in ctx), reverse=True)
    for c in ctx:
        assert len(c.tokens) == len(c.acts) == len(c.token_ids)
        assert c.acts[c.max_pos] == pytest.approx(c.activation, rel=1e-3)  # window acts are float16
        assert max(c.acts) == pytest.approx(c.activation, rel=1e-3)
        assert "<bos>" not in c.tokens
    edges, counts = data.histogram(f)
    assert len(edges) == len(counts) + 1 and counts.sum() == round(table.density[f] * data.meta["n_tokens"])
    details = data.output_details(f)
    assert list(details.columns) == ["token", "token_id", "lens_logit", "rank", "rank_exact", "prob"]
    assert details["rank"].min() == table.min_rank[f]
    assert details["prob"].max() == pytest.approx(table.max_prob[f], rel=1e-6)
    assert table.top_tokens[f] == " | ".join(data.top_tokens(f))
    with pytest.raises(KeyError, match="not in this data"):
        data.contexts(10_000)


def test_windows_are_stored_once_per_sequence_and_round_trip(tiny_lm, tmp_path):
    sae = make_tiny_sae(seed=14)
    seqs = _corpus(tiny_lm, n=40, seed=2)
    data = compute_many(tiny_lm, [sae], seqs, ScoreParams(batch_size=64), n_tokens=None, cache=False)[0]
    arrays = data._arrays()
    assert "ctx_tokens" not in arrays and arrays["seq_tokens"].shape[0] <= len(seqs)
    assert arrays["seq_tokens"].size < data.ctx_tokens.size / 4  # overlapping windows share their sequence
    loaded = FeatureData.load(data.save(tmp_path / "full"))
    np.testing.assert_array_equal(loaded.ctx_tokens, data.ctx_tokens)
    for f in (0, 17, 99):
        seq = data.ctx_seq[f]
        for slot in np.flatnonzero(seq >= 0):  # each window really is a slice of its sequence
            start = data.ctx_start[f, slot]
            tokens = [t if t != tiny_lm.tokenizer.bos_token_id else -1 for t in seqs[seq[slot]]]
            window = [tokens[q] if q < len(tokens) else -1 for q in range(start, start + data.ctx_tokens.shape[2])]
            assert data.ctx_tokens[f, slot].tolist() == window

    trimmed = features_mod.trim_contexts(data, keep=3, window=4)
    again = FeatureData.load(trimmed.save(tmp_path / "trimmed"))
    np.testing.assert_array_equal(again.ctx_tokens, trimmed.ctx_tokens)
    assert [c.tokens for c in again.contexts(17)] == [c.tokens for c in trimmed.contexts(17)]


def test_store_has_judges_completeness_without_loading(tmp_path):
    store = Store(tmp_path)
    assert not store.has("k", "a.npz")
    store.save_arrays("k", "a.npz", {"x": np.arange(3)})
    assert store.has("k", "a.npz")
    path = store.path("k", "a.npz")
    path.write_bytes(path.read_bytes()[:-1])  # truncated: the sidecar's size no longer matches
    assert not store.has("k", "a.npz")
    store.save_arrays("k", "a.npz", {"x": np.arange(3)})
    store.discard("k", "a.npz")
    assert not store.has("k", "a.npz") and not path.exists()
    assert not Store(tmp_path, enabled=False).has("k", "a.npz")
