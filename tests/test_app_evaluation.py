"""The Evaluation page: AppTest on the tiny fixture over evaluation runs of the tiny model (the protocol of
test_evaluate.py) written into a temporary cache — empty state, a finished run, an interrupted run,
damaged runs, runs compared, a shipped run of the previous protocol — and the page's pure helpers
(headlines, progress, commands)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_app import XSS, app, no_exception, texts
from test_evaluate import CONCEPTS, DOCS, N_CONCEPTS, PREFIXES, TINY
from test_feature_level import _tiny_bank

from saesteer import evaluation as evaluate, paths
from saesteer.evaluation import EvalResults, run_evaluation, run_progress
from saesteer.ui import evaltables
from saesteer.ui.nav import PAGES as NAV

PAGE = NAV["evaluation"].path
RUN_SUBDIR = Path("eval") / "tiny-gemma3" / "tiny-topk-L2"  # where `eval` writes for the fixture's layer-2 SAE
#: A concept-level run of the previous protocol, as shipped (packed; methods sae_output, sae_input, sae_random).
SHIPPED_PREVIOUS = paths.EVAL_RESULTS / "gemma-3-270m" / "L5-topk64-w4096"  # L8 and L14 ship runs of the current protocol
CONCEPT_FILES = ("meta.json", "units.parquet", "generations.parquet", "timings.jsonl", "summary.csv", "methods.csv", "units.csv")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_lm, tiny_sae) -> Path:
    """One finished evaluation run of the tiny model (3 concepts evaluated, dog without input-side candidates; 1 skipped)."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    run_evaluation(tiny_lm, tiny_sae, _tiny_bank(tiny_lm, tiny_sae), CONCEPTS, out, TINY, prefixes=PREFIXES, n_concepts=N_CONCEPTS, docs=DOCS)
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


def ship_previous(shipped: Path) -> Path:
    """Copy the shipped previous-protocol run at layer 8 (its concept-level files) into ``shipped``."""
    dest = shipped / "gemma-3-270m" / SHIPPED_PREVIOUS.name
    dest.mkdir(parents=True)
    for name in CONCEPT_FILES:
        shutil.copy(SHIPPED_PREVIOUS / name, dest / name)
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


def test_finished_run_shows_table_ratio_headline_candidates_and_generations(cache, finished_run):
    out = place(finished_run, cache)
    results = evaluate.load_results(out)
    at = open_page()
    assert not at.error and not at.main.warning, [e.value for e in [*at.error, *at.main.warning]]
    shown = texts(at)
    assert evaluate.concept_headline(results).split(":")[0] in shown and "activation pick" in shown
    assert "Previous protocol" not in shown
    table = at.dataframe[0].value
    assert list(table["method"]) == [evaltables.label(m) for m in evaluate.METHODS]
    assert (table["n_concepts"] == 2).all()
    assert {"concept_score", "success_k", "fluency", "ppl", "combined"} <= set(table.columns)
    ratios = next(d.value for d in at.dataframe if "ratio of means" in d.value.columns)
    want = results.ratios()
    assert list(ratios["concepts"]) == [want["sae_filtered"].n, want["sae_output"].n]
    assert ratios["ratio of means"].tolist() == pytest.approx([want["sae_filtered"].ratio, want["sae_output"].ratio], nan_ok=True)
    assert ratios["± s.e."].tolist() == pytest.approx([want["sae_filtered"].se, want["sae_output"].se], nan_ok=True)
    assert len(at.get("plotly_chart")) >= 4
    cands = next(d.value for d in at.dataframe if "activation pick: feature" in d.value.columns)
    units = results.units.set_index(["concept", "method"])
    assert sorted(cands["concept"]) == ["apple", "dog", "king", "zebra"]
    for _, row in cands.iterrows():
        assert row["input-side"] == units.loc[(row["concept"], "sae_output"), "n_input_side"]
        assert row["filtered"] == units.loc[(row["concept"], "sae_output"), "n_filtered"]
        if units.loc[(row["concept"], "sae_activation"), "status"] == "done":
            assert row["activation pick: feature"] == units.loc[(row["concept"], "sae_activation"), "feature"]
            assert row["activation pick: firing share"] == pytest.approx(units.loc[(row["concept"], "sae_activation"), "firing_share"])
            assert row["output pick: output score"] == pytest.approx(units.loc[(row["concept"], "sae_output"), "output_score"])
        else:
            assert pd.isna(row["activation pick: feature"])
            assert ("no input-side candidate" if row["concept"] == "dog" else "all: the concept is not a single token") in row["skipped"]
    per_feature = next(d.value for d in at.dataframe if "firing_share" in d.value.columns and "feature" in d.value.columns)
    assert sorted(per_feature["concept"].unique()) == ["apple", "king"] and len(per_feature) == 4  # two filtered features each
    gens = next(d.value for d in at.dataframe if "text" in d.value.columns)
    expected = results.generations.query("concept == 'apple' and split == 'test'")
    assert sorted(gens["text"]) == sorted(expected["text"])
    labels = [b.proto.label for b in at.get("download_button")]
    assert any("Method table" in b for b in labels) and any("generations" in b.lower() for b in labels)
    most = int(results.units["n_candidates"].max())
    at.number_input(key="ev_min_cand").set_value(most).run()  # only the concept with the most candidates is left
    no_exception(at)
    assert at.dataframe[0].value["n_concepts"].eq(1).all()
    at.checkbox(key="ev_common").uncheck().run()  # each method over its own concepts
    no_exception(at)


def test_shipped_runs_of_the_previous_protocol_are_labelled_and_shown(cache, finished_run):
    shipped = ship_previous(paths.EVAL_RESULTS)
    results = evaluate.load_results(shipped)
    assert results.previous_protocol and "sae_input" in set(results.units["method"])
    at = open_page()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert any("Previous protocol" in i.value for i in at.info)
    assert "Output-score selection" in texts(at)  # the previous headline: output- vs input-score pick
    table = at.dataframe[0].value
    assert evaltables.label("sae_input", previous=True) in set(table["method"])
    picks = next(d.value for d in at.dataframe if "output pick: feature" in d.value.columns)
    assert len(picks) == results.units.query("status == 'done'")["concept"].nunique()
    # beside a run of the current protocol, in the comparison
    place(finished_run, cache)
    at = open_page()
    at.radio(key="ev_view").set_value("compare runs").run()
    at.multiselect(key="ev_compare_runs").set_value([str(shipped), str(cache / RUN_SUBDIR)]).run()
    no_exception(at)
    assert not at.error
    table = next(d.value for d in at.dataframe if "run" in d.value.columns)
    assert set(table["protocol"]) == {"previous", "current"}
    assert "(previous protocol)" in texts(at)


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
    next((out / "units").glob("king-*__sae_filtered.json")).unlink()  # the run stopped inside 'king'
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("finished")
    (out / "meta.json").write_text(json.dumps(meta))
    at = open_page()
    assert not at.error
    warning = " ".join(w.value for w in at.warning)
    assert "incomplete" in warning and "2 of 3 concepts done" in warning and "ago" in warning and "1 partly" in warning and "--resume" in warning
    command = next(c.value for c in at.code if "--resume" in c.value)
    assert command.endswith(f"--out {out} --resume") and "--n-concepts 3" in command
    assert "--tau 0.0138" in command and "--min-contexts 5" in command and "--n-prefixes 4" in command  # the run's own settings
    assert at.dataframe[0].value["n_concepts"].eq(1).all()  # apple: king lacks sae_filtered, dog the input-side methods


def test_a_run_that_has_just_started(cache):
    out = cache / RUN_SUBDIR
    (out / "units").mkdir(parents=True)
    meta = {"model": "tiny-gemma3", "sae_id": "tiny-topk-L2", "layer": 2, "feature_scores": "bundled:tiny-topk-L2", "protocol": evaluate.PROTOCOL,
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
    assert not at.error and "activation pick" in texts(at)
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
    assert texts(at).count("output-filtered features") == 2  # one ratio headline per run


# ---------------------------------------------------------------------------------------------------
# Pure helpers


def _table(rows: dict[str, tuple[float, float]], n: int = 30) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "n_concepts": n, "concept_score": c, "fluency": f, "combined": c * f} for m, (c, f) in rows.items()])


def test_previous_headline_ratio_and_verdict_come_from_the_data():
    held = evaltables.previous_headline(_table({"sae_output": (0.6, 0.8), "sae_input": (0.2, 0.85), "unsteered": (0.0, 1.0)}))
    assert "**3.0×**" in held and "60%" in held and "0.80 vs 0.85" in held and "**holds**" in held and "unsteered 0%" in held
    costly = evaltables.previous_headline(_table({"sae_output": (0.6, 0.4), "sae_input": (0.2, 0.85)}))
    assert "**lower fluency**" in costly
    fails = evaltables.previous_headline(_table({"sae_output": (0.3, 0.8), "sae_input": (0.2, 0.8)}, n=4))
    assert "**1.5×**" in fails and "**does not hold**" in fails and "only 4 concepts" in fails
    assert "never reached" in evaltables.previous_headline(_table({"sae_output": (0.1, 0.8), "sae_input": (0.0, 0.8)}))
    assert "neither reached" in evaltables.previous_headline(_table({"sae_output": (0.0, 0.8), "sae_input": (0.0, 0.8)}))
    assert "no output-score and input-score" in evaltables.previous_headline(_table({"prompt": (0.5, 0.5)}))


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
    custom = {**meta, "params": {**meta["params"], "strengths": [1.0, 8.0], "max_new_tokens": 6, "tau": 0.05},
              "model": "google/gemma-2-2b", "feature_scores": "/f", "sae_id": "rel:layer_20",
              "run": {**meta["run"], "n_concepts": 5, "methods": ["sae_output", "prompt"]}}
    command, notes = evaltables.resume_command(custom, "/o")
    assert command == ("python -m saesteer eval --model google/gemma-2-2b --sae rel:layer_20 --features /f --strengths 1 8 "
                       "--methods sae_output prompt --max-new-tokens 6 --tau 0.05 --n-concepts 5 --out /o --resume")
    assert any("--sae" in n for n in notes)
    # The command is made from the CLI's own flag entries: parsed back, it gives the run's parameters.
    import shlex

    from saesteer.__main__ import build_parser
    from saesteer.cli.evaluate import params_from_args

    parsed = params_from_args(build_parser().parse_args(shlex.split(command)[3:]))
    assert parsed.key() == evaluate.EvalParams.from_key({**custom["params"], "methods": ["sae_output", "prompt"]}).key()
    other = {**meta, "params": {**meta["params"], "n_neutral_texts": 9}}
    assert any("n_neutral_texts" in n for n in evaltables.resume_command(other, "/o")[1])


def test_new_run_command_for_the_selected_sae():
    assert evaltables.new_run_command("gemma-3-270m", "bundled", "L5-topk64-w4096", 5) == "python -m saesteer eval --layer 5 --n-concepts 30"
    cmd = evaltables.new_run_command("google/gemma-2-2b", "release", "gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical", 20, "/c/f")
    assert cmd == ("python -m saesteer eval --model google/gemma-2-2b --sae gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical "
                   "--features /c/f --n-concepts 30")


def test_decode_rate_is_the_recorded_steps_over_the_recorded_decode_time():
    """Arithmetic over the numbers a run recorded in timings.jsonl (nothing is timed here): the page's rate is
    the sum of row_steps over the sum of gen_seconds, and NaN without records."""
    records = pd.DataFrame({"row_steps": [10, 30], "gen_seconds": [1.0, 1.0]})
    assert evaltables.tokens_per_second(records) == 20.0  # (10 + 30) steps / (1 + 1) s
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


def test_shipped_runs_of_the_current_protocol_load_with_their_ratio():
    """The concept-level runs shipped at L8 and L14 are of the current protocol, and their paper's ratio is the
    one the README reports (recomputed here from the shipped generations)."""
    from saesteer.evaluation.results import paired_ratio

    for layer in (8, 14):
        r = evaluate.load_results(paths.EVAL_RESULTS / "gemma-3-270m" / f"L{layer}-topk64-w4096")
        assert not r.previous_protocol and {"sae_activation", "sae_output", "sae_filtered"} <= set(r.units["method"])
    r = evaluate.load_results(paths.EVAL_RESULTS / "gemma-3-270m" / "L8-topk64-w4096")
    ratio = paired_ratio(r.summary(), "sae_output", "sae_activation")
    assert ratio.n == 25 and round(ratio.ratio, 2) == 0.53 and round(ratio.se, 2) == 0.16
