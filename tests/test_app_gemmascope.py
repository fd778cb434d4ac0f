"""The app's Gemma Scope 2 path under AppTest: the sidebar picker (options from sae-lens' installed directory),
the URL that reproduces a pick, the offline message, and scoring a release SAE (subset, measured cost,
confirmation). The hub is offline and sockets are refused; the SAE comes from a local hub cache in tmp_path.
The embedded model is replaced by a 16-layer tiny Gemma 3 (so that a layer-12 SAE fits) except in the slow
test, which uses the real one with its bundled SAEs."""

from __future__ import annotations

import time

import pytest
from test_app import PAGES, app, no_exception, texts

from saesteer import subsets
from saesteer.testing import SCOPE_ID, SCOPE_RELEASE, make_tiny_model, write_scope_cache
from saesteer.ui import loaders, score_plan

REF = f"{SCOPE_RELEASE}:{SCOPE_ID}"


@pytest.fixture(scope="module")
def deep_lm():
    return make_tiny_model(n_layers=16)


@pytest.fixture
def scope_app(real_mode, scope_hub, no_network, monkeypatch, deep_lm, tmp_path):
    """The real sidebar and loaders on the tiny 16-layer model, an empty offline hub cache, fresh caches."""
    monkeypatch.setattr(loaders, "load_model", lambda spec: deep_lm)
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    loaders.load_sae.clear()
    score_plan.rates.clear()
    yield scope_hub
    loaders.load_sae.clear()
    score_plan.rates.clear()


def _pick(at, layer: int = 12, width: str = "16k", sae_id: str = SCOPE_ID):
    at.sidebar.radio(key="sb_sae_source").set_value("gemmascope").run()
    at.sidebar.selectbox(key="sb_gs_release").set_value(SCOPE_RELEASE).run()
    at.sidebar.selectbox(key="sb_gs_layer").set_value(layer).run()
    at.sidebar.selectbox(key="sb_gs_width").set_value(width).run()
    at.sidebar.selectbox(key="sb_gs_sae").set_value(sae_id).run()
    return at


def _param(at, name: str) -> str:
    value = at.query_params[name]
    return value[-1] if isinstance(value, list) else value


def test_picker_offers_the_installed_directory_and_the_url_reproduces_the_pick(scope_app, no_network):
    from saesteer import gemmascope

    write_scope_cache(scope_app)
    at = app().run()
    assert "gemmascope" in at.sidebar.radio(key="sb_sae_source").options or "Gemma Scope 2" in at.sidebar.radio(key="sb_sae_source").options
    at.sidebar.radio(key="sb_sae_source").set_value("gemmascope").run()
    no_exception(at)
    # defaults: the first release, layer 12, 16k, medium
    assert at.sidebar.selectbox(key="sb_gs_release").value == SCOPE_RELEASE
    assert at.sidebar.selectbox(key="sb_gs_layer").value == 12
    assert at.sidebar.selectbox(key="sb_gs_width").value == "16k"
    assert at.sidebar.selectbox(key="sb_gs_sae").value == SCOPE_ID
    entries = gemmascope.catalogue(SCOPE_RELEASE)
    assert at.sidebar.selectbox(key="sb_gs_layer").options == [str(layer) for layer in gemmascope.layers(entries)]
    assert at.sidebar.selectbox(key="sb_gs_sae").options == [s.l0_option for s in gemmascope.sparsities(entries, 12, "16k")]
    assert "medium · L0 60" in at.sidebar.selectbox(key="sb_gs_sae").options
    assert not at.sidebar.error, [e.value for e in at.sidebar.error]
    captions = " ".join(c.value for c in at.sidebar.caption)
    assert f"{SCOPE_RELEASE}/{SCOPE_ID}" in captions and "layer 12" in captions and "loads offline" in captions
    assert _param(at, "sae") == REF and _param(at, "layer") == "12"
    for page in PAGES[:3]:
        at.switch_page(page).run()
        no_exception(at)

    again = app(sae=REF, feature="3").run()  # a shared link
    no_exception(again)
    assert again.sidebar.radio(key="sb_sae_source").value == "gemmascope"
    assert again.sidebar.selectbox(key="sb_gs_sae").value == SCOPE_ID
    assert not again.sidebar.warning and not again.sidebar.error
    big = app(sae=f"{SCOPE_RELEASE}:layer_5_width_262k_l0_big").run()  # the picker follows any id of the directory
    assert big.sidebar.selectbox(key="sb_gs_layer").value == 5 and big.sidebar.selectbox(key="sb_gs_width").value == "262k"
    assert no_network == []


def test_offline_pick_gives_one_clear_message_and_the_app_stays_up(scope_app, no_network):
    at = _pick(app().run(), layer=9, width="65k", sae_id="layer_9_width_65k_l0_small")
    no_exception(at)
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1, errors
    assert "layer_9_width_65k_l0_small" in errors[0] and SCOPE_RELEASE in errors[0]
    assert "needs the hub once" in errors[0] and "then cached" in errors[0]
    assert "Not cached yet" in " ".join(c.value for c in at.sidebar.caption)
    for page in PAGES:
        at.switch_page(page).run()
        no_exception(at)
    at.sidebar.radio(key="sb_sae_source").set_value("bundled").run()
    no_exception(at)
    assert not any("Gemma Scope" in e.value for e in at.sidebar.error)
    assert no_network == []


def test_unknown_id_in_a_link_is_refused_with_a_message(scope_app):
    at = app(sae=f"{SCOPE_RELEASE}:layer_12_width_3k_l0_medium").run()
    no_exception(at)
    assert at.sidebar.radio(key="sb_sae_source").value == "gemmascope"
    assert at.sidebar.selectbox(key="sb_gs_sae").value == SCOPE_ID  # the picker's defaults stand
    assert any("link parameter 'sae' ignored" in w.value and "layer_12_width_3k_l0_medium" in w.value for w in at.sidebar.warning)


def _wait(prefix: str):
    job = next(j for j in loaders.jobs().all() if str(j.target).startswith(prefix))
    deadline = time.time() + 300
    while job.running and time.time() < deadline:
        time.sleep(0.5)
    assert job.done, job.error
    return job


def test_scoring_a_subset_of_a_release_sae_uses_the_background_job_and_cache(scope_app, tmp_path):
    write_scope_cache(scope_app)
    at = _pick(app().run())
    at.switch_page("pages/2_Features_side_by_side.py").run()
    no_exception(at)
    assert "per feature" in texts(at) and "Estimated from a measurement on this machine" in texts(at)
    at.radio(key="cp_scope").set_value("ids").run()
    at.text_input(key="cp_ids").input("1, 5-7, 500").run()
    assert any("feature 500 is out of range" in w.value for w in at.warning)
    at.text_input(key="cp_ids").input("1, 5-7").run()
    at.select_slider(key="cp_tokens").set_value(20_000).run()
    at.button(key="cp_start").click().run()
    no_exception(at)
    job = _wait(str(tmp_path / "cache"))
    assert job.target.name.endswith("-subset")
    at.run()
    no_exception(at)
    assert "4 of 128 features" in " ".join(c.value for c in at.sidebar.caption)
    assert sorted(at.dataframe[1].value["feature"].tolist()) == [1, 5, 6, 7]
    at.session_state["feature"] = 5
    at.switch_page("pages/3_Feature_card.py").run()
    no_exception(at)
    links = [el.proto.url for el in at.get("link_button")]
    assert links == ["https://www.neuronpedia.org/gemma-3-270m/12-gemmascope-2-res-16k/5"]  # from the yaml's Neuronpedia id
    at.session_state["feature"] = 9
    at.run()
    no_exception(at)
    assert any("not among the 4 of 128 features" in i.value for i in at.info)
    assert at.button(key="fc_add_feature")


def test_a_run_above_the_confirmed_cost_is_refused(scope_app, monkeypatch):
    write_scope_cache(scope_app)
    monkeypatch.setattr(subsets, "CONFIRM_WIDTH", 100)  # the 128-wide test SAE stands for a 262k one
    at = _pick(app().run())
    at.switch_page("pages/2_Features_side_by_side.py").run()
    at.radio(key="cp_scope").set_value("all").run()
    at.select_slider(key="cp_tokens").set_value(20_000).run()
    at.button(key="cp_start").click().run()
    no_exception(at)
    assert any("confirm this cost first" in e.value for e in at.error)
    at.checkbox(key="cp_confirm").check().run()
    at.select_slider(key="cp_tokens").set_value(1_000_000).run()  # 50× the corpus after confirming
    at.button(key="cp_start").click().run()
    no_exception(at)
    assert any("more than the" in e.value and "you confirmed" in e.value for e in at.error)
    assert not any(j.running for j in loaders.jobs().all())


@pytest.mark.slow
def test_offline_gemma_scope_on_the_embedded_model_leaves_the_bundled_saes_usable(real_mode, scope_hub, no_network):
    from saesteer.saes import list_bundled

    if not list_bundled():
        pytest.skip("no bundled SAEs installed under assets/saes/")
    loaders.load_sae.clear()
    at = app().run()
    no_exception(at)
    assert not at.sidebar.error, [e.value for e in at.sidebar.error]
    at = _pick(at)
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1 and SCOPE_ID in errors[0] and "needs the hub once" in errors[0] and "about 84 MB" in errors[0]
    at.sidebar.radio(key="sb_sae_source").set_value("bundled").run()
    no_exception(at)
    assert not at.sidebar.error
    at.switch_page("pages/2_Features_side_by_side.py").run()
    no_exception(at)
    assert at.dataframe
    assert no_network == []
