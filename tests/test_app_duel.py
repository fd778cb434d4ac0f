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
    assert first["key"].strength == 2.0
    at.slider(key="duel_strength").set_value(6.0).run()
    no_exception(at)
    second = at.session_state["duel_last"]
    assert second["key"].strength == 6.0 and second["texts"] != first["texts"]
    at.toggle(key="duel_live").set_value(False).run()
    at.slider(key="duel_strength").set_value(4.0).run()
    assert at.session_state["duel_last"]["key"].strength == 6.0  # Live off: nothing restarts
    assert any("Press **Duel**" in c.value for c in at.caption)
    at.button(key="duel_go").click().run()
    assert at.session_state["duel_last"]["key"].strength == 4.0


def test_presenter_url_reproduces_the_duel(duel_env):
    _, k = duel_env
    concept = k[("activation", "output")][0]
    at = duel_app(concept=concept, strength="2.5", seed="7", present="1").run()
    no_exception(at)
    qp = {key: (v[0] if isinstance(v, list) else v) for key, v in at.query_params.items()}
    assert qp["concept"] == concept and qp["strength"] == "2.5" and qp["seed"] == "7" and qp["present"] == "1" and qp["layer"] == "1"
    assert at.session_state["duel_last"]["key"].seed == 7
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


def _banks(layers=(1, 2)):
    from saesteer.evaluation import FeatureBank
    from saesteer.ui import sources

    return {layer: FeatureBank.from_feature_data(sources.tiny_feature_data(layer)) for layer in layers}


def test_a_layer_change_shows_the_new_layers_duel_and_recalibrates_the_strength(duel_env, monkeypatch):
    """Switching the sidebar's layer: Live restarts with the new layer's plan and a strength calibrated there;
    with Live off, nothing of the old layer is shown until the next run."""
    from saesteer import presets
    from saesteer.steering import generate

    parts, _ = duel_env
    banks = _banks()
    said = {layer: {w for key, ws in kinds(parts["lm"], bank).items() if "output" in key for w in ws} for layer, bank in banks.items()}
    concept = sorted(said[1] & said[2])[0]  # an output pick at both layers
    monkeypatch.setattr(presets, "feature_strength", lambda lm, sae, d, f, bank: (1.0 + sae.layer, f"calibrated at layer {sae.layer}"))
    at = duel_app(concept=concept).run()
    no_exception(at)
    assert at.slider(key="duel_strength").value == 2.0  # calibrated at layer 1

    at.selectbox(key="sb_sae_ref").set_value("tiny-topk-L2").run()
    no_exception(at)
    assert at.slider(key="duel_strength").value == 3.0  # recalibrated at layer 2
    last = at.session_state["duel_last"]
    plan = duel.plan(duel.candidates(parts["lm"], banks[2], concept))
    assert last["columns"] == plan.columns
    feats, s = plan.strength_rows(3.0)
    fast = at.checkbox(key="duel_fast").value
    expect = generate(parts["lm"], [duel.NEUTRAL_PROMPT] * len(plan.columns), sae=parts["saes"][2], features=feats, strengths=s,
                      max_new_tokens=32, temperature=0.7, seed=[0] * len(plan.columns), fast=fast)
    assert [last["texts"][c] for c in last["columns"]] == expect  # the new layer's texts
    assert "tiny-topk-L2" in last["key"].sae and last["key"].strength == 3.0
    assert at.session_state["duel_strip"]["key"][0] == last["key"]

    at.toggle(key="duel_live").set_value(False).run()
    at.selectbox(key="sb_sae_ref").set_value("tiny-topk-L1").run()
    no_exception(at)
    assert "duel_last" not in at.session_state and "duel_strip" not in at.session_state
    assert "Verdict." not in texts(at) and any("Press **Duel**" in c.value for c in at.caption)
    at.button(key="duel_go").click().run()
    assert "tiny-topk-L1" in at.session_state["duel_last"]["key"].sae


def test_the_threshold_is_part_of_the_run(duel_env):
    _, k = duel_env
    at = duel_app(concept=k[("activation", "output")][0], strength="2").run()
    first = at.session_state["duel_last"]["key"]
    at.number_input(key="duel_theta").set_value(0.9).run()
    no_exception(at)
    second = at.session_state["duel_last"]["key"]
    assert first.theta != second.theta == 0.9  # Live restarted with the new threshold's picks


@pytest.mark.parametrize("error", ["config", "oom"])
def test_a_failed_calibration_falls_back_and_the_page_stays_up(duel_env, monkeypatch, error):
    from saesteer import presets
    from saesteer.config import ConfigError

    _, k = duel_env

    def failing(*args, **kwargs):
        raise ConfigError("no word to calibrate on") if error == "config" else RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(presets, "feature_strength", failing)  # what the page calibrates a pick with
    at = duel_app(concept=k[("activation", "output")][0]).run()
    no_exception(at)
    errors = " ".join(e.value for e in at.error)
    assert ("no word to calibrate on" in errors) if error == "config" else ("Out of memory while finding a fluent strength" in errors)
    assert at.slider(key="duel_strength").value == presets.FALLBACK_STRENGTH
    assert any(f"Using amp {presets.FALLBACK_STRENGTH:g} instead" in w.value for w in at.warning)
    assert at.session_state["duel_last"]["key"].strength == presets.FALLBACK_STRENGTH  # the duel still ran


def test_device_line_does_not_build_the_fast_copy(monkeypatch):
    from types import SimpleNamespace

    from saesteer import steering
    from saesteer.testing import make_tiny_model
    from saesteer.ui.live import device_line

    def refuse(lm):
        raise AssertionError("the caption built the bf16 copy")

    monkeypatch.setattr(steering, "fast_model", refuse)
    assert "bf16 copy" in device_line(SimpleNamespace(lm=make_tiny_model()), fast=True, rows=3)


def test_the_bank_and_defaults_are_cached_by_sae_weights_and_data_content(word_bank):
    """Cache keys name the SAE by its weights and the feature data by its content, never by ``id()`` (an id is
    reused once its object is freed, and would hand a new SAE the bank of an old one)."""
    import copy
    from types import SimpleNamespace

    from saesteer.testing import WORDS, make_tiny_sae, tiny_feature_data
    from saesteer.ui.live import bank_for, sae_key

    lm, sae, _ = word_bank
    data = tiny_feature_data(lm, sae, WORDS)
    ctx = SimpleNamespace(model_name="tiny", lm=lm, sae=sae, data=data)
    twin = SimpleNamespace(model_name="tiny", lm=lm, sae=copy.deepcopy(sae), data=copy.copy(data))  # same content, other objects
    assert sae_key(twin) == sae_key(ctx) and bank_for(twin) is bank_for(ctx)
    other_sae = make_tiny_sae(layer=1, seed=7)  # same id and layer, other weights
    other = SimpleNamespace(model_name="tiny", lm=lm, sae=other_sae, data=tiny_feature_data(lm, other_sae, WORDS))
    assert other_sae.id == sae.id and sae_key(other) != sae_key(ctx)
    assert bank_for(other) is not bank_for(ctx)
    assert not (bank_for(other).top_ids == bank_for(ctx).top_ids).all()
