"""The Evaluation page: AppTest on the tiny fixture over evaluation runs of the tiny model (the protocol of
test_evaluate.py) written into a temporary cache — empty state, a finished run, an interrupted run,
damaged runs, runs compared — and the page's pure helpers (headline, progress, commands)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_app import XSS, app, no_exception, texts
from test_evaluate import DOCS, PREFIXES, TINY, _tiny_scores

from saesteer import evaluation as evaluate, paths
from saesteer.evaluation import EvalResults, run_evaluation, run_progress
from saesteer.ui import evaltables

PAGE = "pages/6_Evaluation.py"
RUN_SUBDIR = Path("eval") / "tiny-gemma3" / "tiny-topk-L2"  # where `eval` writes for the fixture's layer-2 SAE


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_lm, tiny_sae) -> Path:
    """One finished evaluation run of the tiny model (2 concepts evaluated, 1 skipped)."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    run_evaluation(tiny_lm, tiny_sae, _tiny_scores(tiny_lm, tiny_sae), ["zebra", "apple", "king", "dog"], out, TINY,
                   prefixes=PREFIXES, n_concepts=2, docs=DOCS)
    return out


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """The tiny app fixture with an empty cache of its own and no shipped results."""
    monkeypatch.setenv("SAESTEER_TEST_FIXTURE", "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "EVAL_RESULTS", tmp_path / "shipped")
    return tmp_path / "cache"


def place(run: Path, cache: Path, sub: Path = RUN_SUBDIR) -> Path:
    dest = cache / sub
    shutil.copytree(run, dest)
    return dest


def open_page(**query):
    at = app(**query).run()
    at.switch_page(PAGE).run()
    no_exception(at)
    return at


# ---------------------------------------------------------------------------------------------------
# AppTest


def test_empty_state_names_the_command(cache):
    at = open_page(sae="tiny-topk-L2")  # the command follows the sidebar's SAE
    assert at.title[0].value == "Evaluation"
    assert not at.error
    assert any("No evaluation results yet" in i.value for i in at.info)
    commands = [c.value for c in at.code]
    assert any(c.startswith("python -m saesteer eval") and "--layer 2" in c for c in commands), commands


def test_finished_run_shows_table_headline_figures_picks_and_generations(cache, finished_run):
    out = place(finished_run, cache)
    results = evaluate.load_results(out)
    at = open_page()
    assert not at.error and not at.main.warning, [e.value for e in [*at.error, *at.main.warning]]
    assert "Output-score selection" in texts(at)
    table = at.dataframe[0].value
    assert list(table["method"]) == [evaltables.label(m) for m in evaluate.METHODS]
    assert (table["n_concepts"] == 2).all()
    assert {"concept_score", "success_k", "fluency", "ppl", "combined"} <= set(table.columns)
    assert len(at.get("plotly_chart")) >= 4
    picks = next(d.value for d in at.dataframe if "output pick: feature" in d.value.columns)
    units = results.units.set_index(["concept", "method"])
    for _, row in picks.iterrows():
        assert row["output pick: feature"] == units.loc[(row["concept"], "sae_output"), "feature"]
        assert row["input pick: input score"] == pytest.approx(units.loc[(row["concept"], "sae_input"), "input_score"])
    assert sorted(picks["concept"]) == ["apple", "king"]
    gens = next(d.value for d in at.dataframe if "text" in d.value.columns)
    expected = results.generations.query("concept == 'apple' and split == 'test'")
    assert sorted(gens["text"]) == sorted(expected["text"])
    labels = [b.proto.label for b in at.get("download_button")]
    assert any("Method table" in b for b in labels) and any("generations" in b.lower() for b in labels)
    most = int(picks["candidates"].max())
    at.number_input(key="ev_min_cand").set_value(most).run()  # only the concept with the most candidates is left
    no_exception(at)
    assert at.dataframe[0].value["n_concepts"].eq(1).all()


def test_untrusted_concepts_and_texts_are_shown_as_plain_text(cache, finished_run):
    out = place(finished_run, cache)
    for path in (out / "units").glob("king-*"):
        if path.suffix == ".json":
            unit = json.loads(path.read_text())
            path.write_text(json.dumps({**unit, "concept": XSS[0]}))
        elif path.suffix == ".parquet":
            rows = pd.read_parquet(path)
            pd.DataFrame(rows.assign(concept=XSS[0], text=XSS[1])).to_parquet(path, index=False)
    at = open_page()
    at.selectbox(key="ev_gen_concept").set_value(XSS[0]).run()
    no_exception(at)
    gens = next(d.value for d in at.dataframe if "text" in d.value.columns)
    assert set(gens["text"]) == {XSS[1]} and set(gens["concept"]) == {XSS[0]}
    rendered = texts(at)
    assert "<script>" not in rendered and "<img" not in rendered


def test_interrupted_run_says_how_far_it_got_and_how_to_resume(cache, finished_run):
    out = place(finished_run, cache)
    next((out / "units").glob("king-*__sae_input.json")).unlink()  # the run stopped inside 'king'
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("finished")
    (out / "meta.json").write_text(json.dumps(meta))
    at = open_page()
    assert not at.error
    warning = " ".join(w.value for w in at.warning)
    assert "incomplete" in warning and "1 of 2 concepts done" in warning and "ago" in warning and "1 partly" in warning and "--resume" in warning
    command = next(c.value for c in at.code if "--resume" in c.value)
    assert command.endswith(f"--out {out} --resume") and "--n-concepts 2" in command
    assert at.dataframe[0].value["n_concepts"].eq(1).all()  # the finished concept only


def test_a_run_that_has_just_started(cache):
    out = cache / RUN_SUBDIR
    (out / "units").mkdir(parents=True)
    meta = {"model": "tiny-gemma3", "sae_id": "tiny-topk-L2", "layer": 2, "feature_scores": "bundled:tiny-topk-L2",
            "params": evaluate.EvalParams().key(), "run": {"concepts": ["apple"], "n_concepts": 1, "methods": list(evaluate.METHODS)}}
    (out / "meta.json").write_text(json.dumps(meta))
    at = open_page()
    assert not at.error
    assert any("0 of 1 concept done" in w.value for w in at.warning)
    assert any("has not finished its first concept" in i.value for i in at.info)


def test_damaged_runs_are_errors_and_the_app_stays_up(cache, finished_run):
    good = place(finished_run, cache)
    bad_parquet = place(finished_run, cache, Path("eval") / "tiny-gemma3" / "broken-parquet")
    next((bad_parquet / "units").glob("apple-*__sae_output.parquet")).write_bytes(b"PAR1 this is not parquet")
    bad_meta = place(finished_run, cache, Path("eval") / "tiny-gemma3" / "broken-meta")
    (bad_meta / "meta.json").write_text("{not json")
    at = open_page(sae="tiny-topk-L2")
    assert at.selectbox(key="ev_run").value == str(good)  # the sidebar's SAE run is opened first
    for path, problem in ((bad_parquet, "parquet"), (bad_meta, "meta.json")):
        at.selectbox(key="ev_run").set_value(str(path)).run()
        no_exception(at)
        errors = " ".join(e.value for e in at.error)
        assert "Could not read the evaluation" in errors and problem in errors.replace("\\", "").lower(), errors
    at.selectbox(key="ev_run").set_value(str(good)).run()
    no_exception(at)
    assert not at.error and "Output-score selection" in texts(at)
    at.radio(key="ev_view").set_value("compare runs").run()  # the comparison skips the damaged run and says so
    no_exception(at)
    assert any("Could not read" in e.value for e in at.error)


def test_compare_runs_of_two_layers(cache, finished_run):
    place(finished_run, cache)
    other = place(finished_run, cache, Path("eval") / "tiny-gemma3" / "tiny-topk-L3")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "layer": 3, "sae_id": "tiny-topk-L3"}))
    at = open_page()
    at.radio(key="ev_view").set_value("compare runs").run()
    no_exception(at)
    assert not at.error
    table = next(d.value for d in at.dataframe if "run" in d.value.columns)
    assert sorted(table["layer"].unique()) == [2, 3] and len(table) == 2 * len(evaluate.METHODS)
    assert len(at.get("plotly_chart")) == 1
    assert texts(at).count("Output-score selection") == 2


# ---------------------------------------------------------------------------------------------------
# Pure helpers


def _table(rows: dict[str, tuple[float, float]], n: int = 30) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "n_concepts": n, "concept_score": c, "fluency": f, "combined": c * f} for m, (c, f) in rows.items()])


def test_headline_ratio_and_verdict_come_from_the_data():
    held = evaltables.headline(_table({"sae_output": (0.6, 0.8), "sae_input": (0.2, 0.85), "unsteered": (0.0, 1.0)}))
    assert "**3.0×**" in held and "60%" in held and "0.80 vs 0.85" in held and "**holds**" in held and "unsteered 0%" in held
    costly = evaltables.headline(_table({"sae_output": (0.6, 0.4), "sae_input": (0.2, 0.85)}))
    assert "**lower fluency**" in costly
    fails = evaltables.headline(_table({"sae_output": (0.3, 0.8), "sae_input": (0.2, 0.8)}, n=4))
    assert "**1.5×**" in fails and "**does not hold**" in fails and "only 4 concepts" in fails
    assert "never reached" in evaltables.headline(_table({"sae_output": (0.1, 0.8), "sae_input": (0.0, 0.8)}))
    assert "neither reached" in evaltables.headline(_table({"sae_output": (0.0, 0.8), "sae_input": (0.0, 0.8)}))
    assert "no output-score and input-score" in evaltables.headline(_table({"prompt": (0.5, 0.5)}))


def _results(units: list[tuple[str, str, str]], meta: dict) -> EvalResults:
    frame = pd.DataFrame(units, columns=["concept", "method", "status"])
    return EvalResults(pd.DataFrame(), frame, meta, pd.DataFrame())


def test_run_progress_counts_done_partial_and_skipped_concepts(tmp_path):
    methods = ["sae_output", "prompt"]
    units = [("a", "sae_output", "done"), ("a", "prompt", "done"), ("b", "sae_output", "done"),
             ("z", "sae_output", "skipped"), ("z", "prompt", "skipped")]
    recorded = {"run": {"concepts": ["z", "a", "b"], "n_concepts": 5, "methods": methods}, "params": {"methods": methods}}
    p = run_progress(_results(units, recorded), tmp_path)
    assert (p.finished, p.n_done, p.n_partial, p.n_skipped, p.target) == (False, 1, 1, 1, 5)
    p = run_progress(_results(units[:2], {**recorded, "finished": "2026-01-01T00:00:00"}), tmp_path)
    assert p.finished and p.n_done == 1
    # A run written before the goal was recorded: the report files mark it finished.
    legacy = {"params": {"methods": methods}}
    assert not run_progress(_results(units[:2], legacy), tmp_path).finished
    (tmp_path / "methods.csv").write_text("method\n")
    p = run_progress(_results(units[:2], legacy), tmp_path)
    assert p.finished and p.target is None


def test_resume_command_repeats_the_run_settings():
    meta = {"model": "gemma-3-270m", "sae_id": "L8-topk64-w4096", "layer": 8, "feature_scores": "bundled:L8-topk64-w4096",
            "params": evaluate.EvalParams().key(), "prefixes": evaluate.default_prefixes()[:20],
            "run": {"concepts": evaluate.default_concepts(), "n_concepts": 30, "methods": list(evaluate.METHODS)}, "judge": None}
    command, notes = evaltables.resume_command(meta, "/data/my runs/L8")
    assert command == "python -m saesteer eval --layer 8 --out '/data/my runs/L8' --resume" and notes == []
    custom = {**meta, "params": {**meta["params"], "strengths": [1.0, 8.0], "max_new_tokens": 6}, "model": "google/gemma-2-2b",
              "feature_scores": "/f", "sae_id": "rel:layer_20", "run": {**meta["run"], "n_concepts": 5, "methods": ["sae_output", "prompt"]}}
    command, notes = evaltables.resume_command(custom, "/o")
    assert command == ("python -m saesteer eval --model google/gemma-2-2b --sae rel:layer_20 --features /f --strengths 1 8 "
                       "--max-new-tokens 6 --methods sae_output prompt --n-concepts 5 --out /o --resume")
    assert any("--sae" in n for n in notes)


def test_new_run_command_for_the_selected_sae():
    assert evaltables.new_run_command("gemma-3-270m", "bundled", "L5-topk64-w4096", 5) == "python -m saesteer eval --layer 5 --n-concepts 30"
    cmd = evaltables.new_run_command("google/gemma-2-2b", "release", "gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical", 20, "/c/f")
    assert cmd == ("python -m saesteer eval --model google/gemma-2-2b --sae gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical "
                   "--features /c/f --n-concepts 30")
    assert evaltables.tokens_per_second(pd.DataFrame({"row_steps": [10, 30], "gen_seconds": [1.0, 1.0]})) == 20.0
    assert math.isnan(evaltables.tokens_per_second(pd.DataFrame()))


# ---------------------------------------------------------------------------------------------------
# Feature level


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory, tiny_lm, tiny_sae) -> Path:
    from test_feature_level import PREFIXES as FL_PREFIXES
    from test_feature_level import TINY as FL_TINY
    from test_feature_level import _tiny_bank

    from saesteer.evaluation.feature_level import FeatureLevelRun, write_feature_scores

    out = tmp_path_factory.mktemp("flrun") / "features"
    bank = _tiny_bank(tiny_lm, tiny_sae)
    run = FeatureLevelRun(tiny_lm, tiny_sae, bank, out, FL_TINY, prefixes=FL_PREFIXES)
    write_feature_scores(out, bank, run.features)
    run.run()
    return out


def test_feature_level_run_shows_headline_curve_scatter_and_histogram(cache, feature_run, finished_run):
    from saesteer.evaluation.feature_level import feature_summary, headline, load_feature_run

    place(finished_run, cache)
    place(feature_run, cache, RUN_SUBDIR / "features")
    at = open_page()
    assert not at.error, [e.value for e in at.error]
    expected = headline(feature_summary(load_feature_run(cache / RUN_SUBDIR / "features").features))
    assert expected.split(":")[0] in texts(at)
    assert len(at.get("plotly_chart")) >= 3 + 4  # feature level (3) + the concept run's figures
    thr = next(d.value for d in at.dataframe if "mean_above" in d.value.columns)
    assert len(thr) == 14
    # the concept-level table is still the concept-level run's, not the feature-level run's
    assert any("n_concepts" in d.value.columns for d in at.dataframe)


def test_a_damaged_feature_run_is_reported_and_the_page_stays_up(cache, feature_run):
    dest = place(feature_run, cache, RUN_SUBDIR / "features")
    next((dest / "units").glob("f*.parquet")).write_bytes(b"not parquet")
    at = open_page()
    assert any("could not be read" in w.value for w in at.warning)
