"""Scores of many SAEs on a local Ray cluster (2 CPUs) with the tiny model: equal to a local run, resumable
after a worker dies, clear errors; and the exact shard merge of the activation pass (no Ray needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saesteer.activations import activation_pass, merge_stats
from saesteer.config import ScoreParams
from saesteer.features import OUTPUT_CHUNK, compute_many
from saesteer.store import Store

from saesteer.testing import TinyLoader

REFS = [("topk", 1, 0, 2 * OUTPUT_CHUNK + 100), ("jumprelu", 3, 1, 300)]  # three chunks (the last short) and one
PARAMS = ScoreParams(batch_size=64)
FIELDS = ("n_tokens", "n_sequences", "fire_count", "max_activation", "hist_counts", "top_acts", "top_seq", "top_pos",
          "top_token", "win_start", "win_tokens", "win_acts")


def corpus(lm, n: int = 70, length: int = 20, seed: int = 0) -> list[list[int]]:
    from saesteer.testing import WORDS, word_sequences

    return word_sequences(lm.tokenizer, WORDS, n=n, length=length, seed=seed)


def assert_stats_equal(a, b) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert np.array_equal(x, y), f"{f} differs"


# ---------------------------------------------------------------------------------------------------
# The merge (no Ray)


def test_shards_merge_to_one_pass_bit_for_bit(tiny_lm):
    """Shards starting at multiples of the batch, merged in any grouping, equal one pass over the corpus."""
    loader = TinyLoader()
    saes = [loader.sae(r, tiny_lm) for r in REFS[:1]] + [loader.sae(("standard", 2, 3, 64), tiny_lm)]
    seqs = corpus(tiny_lm)
    for s in seqs[5:40:7]:  # repeated sequences: equal activations, where the tie-break decides
        seqs.append(list(s))
    whole = activation_pass(tiny_lm, saes, seqs, batch_size=8, top_n=10)
    cuts = [0, 16, 40, 64, len(seqs)]
    parts = [activation_pass(tiny_lm, saes, seqs[a:b], batch_size=8, top_n=10, first_sequence=a) for a, b in zip(cuts, cuts[1:])]
    for k in range(len(saes)):
        p = [part[k] for part in parts]
        left = merge_stats(merge_stats(merge_stats(p[0], p[1]), p[2]), p[3])
        right = merge_stats(p[0], merge_stats(p[1], merge_stats(p[2], p[3])))
        shuffled = merge_stats(merge_stats(p[3], p[1]), merge_stats(p[2], p[0]))
        for merged in (left, right, shuffled):
            assert_stats_equal(merged, whole[k])
        assert (whole[k].top_seq >= 0).sum() > 0


def test_merge_refuses_overlapping_or_foreign_parts(tiny_lm, tiny_sae):
    seqs = corpus(tiny_lm, n=20)
    [a] = activation_pass(tiny_lm, [tiny_sae], seqs[:10], batch_size=5, top_n=5)
    with pytest.raises(ValueError, match="share sequence"):
        merge_stats(a, a)
    other = TinyLoader().sae(("topk", 2, 9, 64), tiny_lm)
    [b] = activation_pass(tiny_lm, [other], seqs[10:], batch_size=5, top_n=5, first_sequence=10)
    with pytest.raises(ValueError, match="different SAEs"):
        merge_stats(a, b)


# ---------------------------------------------------------------------------------------------------
# Ray


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from saesteer.distributed import ClusterParams, connect

    ray = connect(ClusterParams(num_cpus=2))
    yield ray
    ray.shutdown()


def _job(tiny_lm, tmp_path, only="all", **kw):
    from saesteer.distributed import ClusterParams, run_job

    loader = TinyLoader()
    saes = [loader.sae(r, tiny_lm) for r in REFS]
    seqs = corpus(tiny_lm)
    cluster = ClusterParams(shard_sequences=24, max_retries=kw.pop("max_retries", 3))
    store = Store(tmp_path / "ray")
    return saes, seqs, lambda **more: run_job(tiny_lm, saes, REFS, loader, seqs, PARAMS, None, only, store, "test", cluster,
                                              batch_sequences=8, **{**kw, **more})


def test_ray_run_equals_local_run(ray_cluster, tiny_lm, tmp_path):
    """Every score, token, context and histogram of a Ray run equals the local run's: integers exactly, floats to
    1e-6 relative (tasks use one torch thread, the local run two; the figures below say whether bits differ)."""
    saes, seqs, job = _job(tiny_lm, tmp_path)
    calls = []
    got, report = job(progress=lambda done, total, what: calls.append((done, total)))
    local = compute_many(tiny_lm, saes, seqs, PARAMS, None, store=Store(tmp_path / "local"), batch_sequences=8, corpus_name="test")
    assert report.submitted == 3 + 1 + 3  # chunks of SAE 0 and 1, then 3 shards of 24 sequences, each for both SAEs (one group)
    assert calls[0] == (0, report.submitted) and calls[-1] == (report.submitted, report.submitted)
    assert all(n == 1 for n in report.model_loads.values()) and 1 <= len(report.pids) <= 2  # the model once per worker
    for g, l in zip(got, local):
        assert g.meta["key"] == l.meta["key"]
        for col in ("feature", "min_rank", "n_contexts", "top_tokens", "bottom_tokens"):
            assert g.table[col].tolist() == l.table[col].tolist(), col
        for col in ("output_score", "max_prob", "density", "max_activation", "input_score"):
            np.testing.assert_allclose(g.table[col].to_numpy(float), l.table[col].to_numpy(float), rtol=1e-6, atol=0, equal_nan=True)
        for name in ("ctx_seq", "ctx_pos", "ctx_tokens", "hist_counts", "out_ranks"):
            assert np.array_equal(getattr(g, name), getattr(l, name)), name
        np.testing.assert_allclose(g.ctx_acts.astype(float), l.ctx_acts.astype(float), rtol=1e-3)
        assert np.array_equal(g.lens.top_ids, l.lens.top_ids)
    # a second run finds everything cached: nothing is submitted, the same data comes back
    again, report2 = job()
    assert report2.submitted == 0 and report2.cached == report.submitted
    assert again[0].table.equals(got[0].table)


def test_killed_worker_then_rerun_computes_only_missing_chunks(ray_cluster, tiny_lm, tmp_path):
    from saesteer.distributed import JobFailed

    saes, _, job = _job(tiny_lm, tmp_path, only="output", max_retries=0)
    with pytest.raises(JobFailed, match=r"1 of 4 tasks failed .*features 512-1023.*rerun the same command"):
        job(kill=(saes[0].id, OUTPUT_CHUNK))
    data, report = job()
    assert report.chunk_tasks == [(saes[0].id, OUTPUT_CHUNK)] and report.cached == 3
    local = compute_many(tiny_lm, saes, None, PARAMS, None, only="output", store=Store(tmp_path / "local"))
    for a, b in zip(data, local):
        np.testing.assert_allclose(a.table["output_score"], b.table["output_score"], rtol=1e-6)


def test_failed_shard_then_rerun_computes_only_missing_shards(ray_cluster, tiny_lm, tmp_path):
    """A job with the activation pass whose middle shard's worker dies: the rerun runs that shard only (the saved
    shards count as done) and the result equals a clean run's, bit for bit."""
    from saesteer.distributed import JobFailed

    saes, _, job = _job(tiny_lm, tmp_path, max_retries=0)
    with pytest.raises(JobFailed, match=r"1 of 7 tasks failed .*corpus sequences 24-47.*rerun the same command"):
        job(kill_shard=24)
    data, report = job()
    assert report.shard_tasks == [(24, 48)] and report.chunk_tasks == [] and report.cached == 6
    _, _, clean_job = _job(tiny_lm, tmp_path / "clean")
    clean, _ = clean_job()
    for a, b in zip(data, clean):
        assert a.table.equals(b.table)
        for name in ("ctx_seq", "ctx_pos", "ctx_tokens", "ctx_acts", "hist_counts", "out_ranks"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_bad_address_is_a_clear_error(ray_cluster):
    from saesteer.distributed import ClusterParams, RayUnavailable, connect

    with pytest.raises(RayUnavailable, match=r"no Ray cluster at 127\.0\.0\.1:1 .*ray start --head"):
        connect(ClusterParams(address="127.0.0.1:1"))
    with pytest.raises(RayUnavailable, match="not HOST:PORT"):
        connect(ClusterParams(address="nonsense"))


def test_missing_ray_is_a_clear_error(monkeypatch):
    from saesteer.distributed import RayUnavailable, import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the package
    with pytest.raises(RayUnavailable, match=r"pip install 'ray==2\.60\.0'"):
        import_ray()


def test_cli_bad_address_fails_before_the_model_loads(capsys, monkeypatch):
    from saesteer import models
    from saesteer.__main__ import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(["scores", "--layers", "2,5", "--only", "output", "--ray", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Ray cluster at 127.0.0.1:1") and len(err.strip().splitlines()) == 1


def test_cli_refuses_bad_selections(capsys):
    from saesteer.__main__ import main

    assert main(["scores", "--layers", "3"]) == 2
    assert "no bundled SAE for gemma-3-270m at layer(s) 3; bundled layers: 2, 5, 8, 11, 14, 17" in capsys.readouterr().err
    assert main(["scores", "--ids", "layer_*"]) == 2
    assert "give --release too" in capsys.readouterr().err
    assert main(["scores", "--release", "gemma-scope-2-270m-pt-res-all", "--ids", "nothing_*"]) == 2
    assert "has no SAE with ids matching 'nothing_*'" in capsys.readouterr().err
    assert main(["scores", "--layers", "2", "--features", "1,2"]) == 2
    assert "--features applies to one SAE" in capsys.readouterr().err


def test_release_selection_by_pattern_and_layers():
    from saesteer.saes import select

    specs = select(release="gemma-scope-2-270m-pt-res-all", pattern="layer_*_width_16k_l0_small", layers=[0, 1, 17])
    assert [s.sae_id for s in specs] == [f"layer_{i}_width_16k_l0_small" for i in (0, 1, 17)]
    every = select(release="gemma-scope-2-270m-pt-res-all")  # 18 layers x {16k, 262k} x {small, big} L0
    assert len(every) == 72 and [int(s.sae_id.split("_")[1]) for s in every] == sorted(i for i in range(18) for _ in range(4))


def test_scores_without_ray_never_imports_ray(tmp_path):
    """A real (small) scores run on the embedded model, in a fresh interpreter: Ray stays unimported."""
    code = (
        "import sys; from saesteer.__main__ import main; "
        "rc = main(['scores', '--layer', '2', '--features', '0-3', '--only', 'output', '--no-cache']); "
        "assert rc == 0, rc; print('RAY' if 'ray' in sys.modules else 'NO-RAY')"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NO-RAY"


def test_saved_data_shows_in_the_layers_overview(ray_cluster, tiny_lm, tmp_path, monkeypatch):
    """What `scores --release … --ray` saves is what the Layers overview lists for SAEs that ship no data."""
    from saesteer.config import SaeSpec
    from saesteer.paths import app_feature_dir
    from saesteer.store import sae_fingerprint
    from saesteer.ui import loaders

    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    saes, _, job = _job(tiny_lm, tmp_path, only="output")
    data, _ = job()
    choices = []
    for sae, d in zip(saes, data):
        d.save(app_feature_dir(tiny_lm.name, sae.id, sae_fingerprint(sae)))
        release, sae_id = "some-release", sae.id
        sae.id = f"{release}/{sae_id}"  # as load_sae names a release's SAE
        d.save(app_feature_dir(tiny_lm.name, sae.id, sae_fingerprint(sae)))
        choices.append(loaders.SaeChoice(layer=sae.layer, label=sae.id, spec=SaeSpec(source="release", release=release, sae_id=sae_id), ref=sae.id))
    tables = loaders.layer_tables(tiny_lm.name, choices)
    assert sorted(tables) == [1, 3]
    for sae, d in zip(saes, data):
        assert tables[sae.layer]["output_score"].tolist() == d.table["output_score"].tolist()
