"""The concept duel page through AppTest on the tiny fixture: a concept with both picks, with only one kind of
candidate, with none; live restarts on a strength change; the presenter URL; bad input from a link."""

from __future__ import annotations

from pathlib import Path

import pytest

from saesteer import duel
from test_app import no_exception, texts
from test_duel import LOOSE, kinds

ROOT = Path(__file__).resolve().parents[1]
PAGE = "pages/0_Concept_duel.py"


@pytest.fixture
def duel_env(fixture_env, monkeypatch):
    """Looser candidate thresholds, so that the random fixture has concepts of every kind (see test_duel.LOOSE)."""
    monkeypatch.setattr(duel, "DUEL_CANDIDATES", LOOSE)
    from saesteer.ui import sources

    parts = sources.tiny_parts()
    data = sources.tiny_feature_data(1)
    from saesteer.evaluation import FeatureBank

    return parts, kinds(parts["lm"], FeatureBank.from_feature_data(data))


def duel_app(**query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / PAGE), default_timeout=120)
    at.query_params.update({"layer": "1", **query})
    return at


def test_duel_with_both_picks_streams_three_columns(duel_env):
    parts, k = duel_env
    concept = k[("activation", "output")][0]
    at = duel_app(concept=concept, strength="3").run()
    no_exception(at)
    last = at.session_state["duel_last"]
    assert last["columns"] == ("baseline", "activation", "output")
    assert all(last["texts"][c] for c in last["columns"])
    out = texts(at)
    assert "What fires on it" in out and "What says it" in out and "Verdict." in out
    assert out.count("fluency") >= 3 and "said" in out
    # the three columns are one 3-row batch: what generate gives for the same rows
    from saesteer.steering import generate

    from saesteer.evaluation import FeatureBank
    from saesteer.ui import sources

    plan = duel.plan(duel.candidates(parts["lm"], FeatureBank.from_feature_data(sources.tiny_feature_data(1)), concept))
    feats, s = plan.strength_rows(3.0)
    fast = at.checkbox(key="duel_fast").value
    expect = generate(parts["lm"], ["From my experience,"] * 3, sae=parts["saes"][1], features=feats, strengths=s, max_new_tokens=32,
                      temperature=0.7, seed=[0] * 3, fast=fast)
    assert [last["texts"][c] for c in last["columns"]] == expect
    assert at.session_state["duel_strip"]["texts"]  # the strength strip ran under the columns


def test_duel_with_only_output_candidates_says_so(duel_env):
    _, k = duel_env
    at = duel_app(concept=k[("output",)][0]).run()
    no_exception(at)
    assert at.session_state["duel_last"]["columns"] == ("baseline", "output")
    assert any("no feature fires on" in i.value for i in at.info)
    assert "Only the output pick" in texts(at)


def test_duel_with_no_candidate_says_so(duel_env):
    _, k = duel_env
    at = duel_app(concept=k[()][0]).run()
    no_exception(at)
    infos = [i.value for i in at.info]
    assert any("no feature fires on" in i for i in infos) and any("no feature says" in i for i in infos)
    assert at.session_state["duel_last"]["columns"] == ("baseline",)
    assert "No feature to compare" in texts(at)
    at = duel_app(concept="zebra").run()  # not in the vocabulary
    no_exception(at)
    assert any("not one token" in i.value for i in at.info)


def test_live_strength_restarts_the_columns_without_a_click(duel_env):
    _, k = duel_env
    at = duel_app(concept=k[("activation", "output")][0], strength="2").run()
    first = at.session_state["duel_last"]
    assert first["key"][1] == 2.0
    at.slider(key="duel_strength").set_value(6.0).run()
    no_exception(at)
    second = at.session_state["duel_last"]
    assert second["key"][1] == 6.0 and second["texts"] != first["texts"]
    at.toggle(key="duel_live").set_value(False).run()
    at.slider(key="duel_strength").set_value(4.0).run()
    assert at.session_state["duel_last"]["key"][1] == 6.0  # Live off: nothing restarts
    assert any("Press **Duel**" in c.value for c in at.caption)
    at.button(key="duel_go").click().run()
    assert at.session_state["duel_last"]["key"][1] == 4.0


def test_presenter_url_reproduces_the_duel(duel_env):
    _, k = duel_env
    concept = k[("activation", "output")][0]
    at = duel_app(concept=concept, strength="2.5", seed="7", present="1").run()
    no_exception(at)
    qp = {key: (v[0] if isinstance(v, list) else v) for key, v in at.query_params.items()}
    assert qp["concept"] == concept and qp["strength"] == "2.5" and qp["seed"] == "7" and qp["present"] == "1" and qp["layer"] == "1"
    assert at.session_state["duel_last"]["key"][4] == 7
    assert "font-size: 1.5em" in texts(at)  # large type
    assert "What am I looking at?" in texts(at) and "output score" in texts(at)


def test_bad_duel_links_are_refused_and_the_page_stays_up(duel_env):
    at = duel_app(concept="x" * 80, seed="-3", present="maybe").run()
    no_exception(at)
    warnings = " ".join(w.value for w in at.warning)
    assert "concept" in warnings and "seed" in warnings and "present" in warnings
    at.text_input(key="duel_concept").input("   ").run()
    no_exception(at)
    assert any("Type a concept" in i.value for i in at.info)


def test_device_line_names_the_device_and_the_path_taken(monkeypatch):
    from types import SimpleNamespace

    import torch

    from saesteer.testing import make_tiny_model
    from saesteer import steering
    from saesteer.ui.live import device_line

    lm = make_tiny_model()
    ctx = SimpleNamespace(lm=lm)
    assert device_line(ctx, fast=False) == "Running on the **CPU** (the exact float32 model), all 3 columns in one batch."
    assert "exact float32" in device_line(ctx, fast=True, rows=steering.FAST_MAX_BATCH + 1)  # too many rows for the copy
    assert "bf16 copy" in device_line(ctx, fast=True, rows=2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA H200")
    gpu = SimpleNamespace(lm=SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32, model=lm.model))
    assert device_line(gpu, fast=False) == "Running on **NVIDIA H200** (CUDA): the exact float32 model, all 3 columns in one batch."
