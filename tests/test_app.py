"""The Streamlit app, driven with AppTest on the tiny test fixture, and the pure helpers of saesteer.ui.

``SAESTEER_TEST_FIXTURE=tiny`` makes the app's sources the tiny random model and SAEs of saesteer.testing; the
feature data is computed on them. Nothing here is a trained model: the tests check the app's behaviour.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load as load_safetensors

from saesteer.config import EMBEDDED_MODEL, ModelSpec
from saesteer.text import split_tokens
from saesteer.ui import render, search, state, sweep, tables
from saesteer.ui.nav import PAGES as NAV
from saesteer.ui.exports import card_json, scores_csv, steering_vector

ROOT = Path(__file__).resolve().parents[1]
#: Every page but the start page, in the app's order (``nav.PAGES``: the one page list).
PAGES = [info.path for key, info in NAV.items() if key != "home"]
XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]
TIMEOUT = 120


# ---------------------------------------------------------------------------------------------------
# Pure helpers


def test_context_html_escapes_every_token():
    tokens = ["a", XSS[0], " b", XSS[1], "\n", '"q"']
    out = render.context_html(tokens, [0.0, 2.0, 1.0, 4.0, 0.0, 0.5], max_pos=3)
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "&lt;img src=x onerror=alert(1)&gt;" in out
    assert "&quot;q&quot;" in out and "⏎" in out
    spans = out.split('<span class="tok"')[1:]
    assert len(spans) == len(tokens)
    assert "outline" in spans[3] and "outline" not in spans[1]  # the max token is marked
    assert "rgba(255, 140, 0, 1.0)" in spans[3] and "rgba(255, 140, 0, 0.5)" in spans[1]
    with pytest.raises(ValueError):
        render.context_html(["a"], [1.0, 2.0])


def test_md_token_neutralises_markdown_and_html():
    out = render.md_token("**<b>x</b>** [a](javascript:1)")
    assert "<b>" not in out and "**" not in out and "](" not in out


def test_query_params_validation(tmp_path):
    roots = [tmp_path]
    inside = tmp_path / "sae"
    inside.mkdir()
    parsed = state.parse_query_params(
        {"model": EMBEDDED_MODEL, "sae": str(inside), "layer": "5", "feature": "17", "prompt": "Hi", "strength": "2.5", "mode": "additive"}, roots
    )
    assert parsed.problems == []
    assert parsed.state == state.ViewState(EMBEDDED_MODEL, str(inside), 5, 17, "Hi", 2.5, "additive")
    assert state.parse_query_params(parsed.state.to_params(), roots).state == parsed.state  # round trip

    ok = state.parse_query_params({"model": "google/gemma-2-2b", "sae": "gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical"}, roots)
    assert ok.problems == [] and ok.state.sae.startswith("gemma-scope")

    bad = state.parse_query_params(
        {
            "model": "/etc",
            "sae": str(tmp_path / ".." / "elsewhere"),
            "layer": "-1",
            "feature": "1e3",
            "strength": "inf",
            "mode": "evil",
            "prompt": "x" * 5000,
        },
        roots,
    )
    assert bad.state == state.ViewState()
    assert len(bad.problems) == 7
    assert any("outside the allowed folders" in p and "'/etc'" in p for p in bad.problems)
    assert any("sae" in p and "outside" in p for p in bad.problems)


def test_paths_resolve_symlinks_before_confinement(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    assert not state.is_within(root / "link", [root])
    assert state.is_within(root / "a" / ".." / "b", [root])


def split(joined: str) -> list[str]:
    return split_tokens(joined)


def test_tables_rank_filter_page_and_shares():
    table = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3],
            "output_score": [0.1, 0.4, 0.4, 0.0],
            "input_score": [0.9, np.nan, 0.2, 0.6],
            "top_tokens": ["apple | pie", "France", "▁Apple", "x"],
            "bottom_tokens": ["", "", "", "zz"],
        }
    )
    r = tables.ranked(table, "output_score")
    assert r["feature"].tolist() == [1, 2, 0, 3] and r["rank"].tolist() == [1, 2, 3, 4]
    assert tables.ranked(table, "input_score")["feature"].tolist() == [0, 3, 2, 1]  # NaN last
    assert tables.filter_features(table, search="APPLE")["feature"].tolist() == [0, 2]
    assert tables.filter_features(table, input_min=0.5)["feature"].tolist() == [0, 3]
    assert tables.filter_features(table, output_min=0.2)["feature"].tolist() == [1, 2]
    assert tables.n_pages(0, 10) == 1 and tables.n_pages(21, 10) == 3
    assert tables.page_of(r, 9, 3)["feature"].tolist() == [3]  # clamped to the last page
    shares = tables.threshold_shares({7: table}, 0.5, 0.1)
    assert shares.loc[0, "input_share"] == 0.5 and shares.loc[0, "output_share"] == 0.75 and shares.loc[0, "both_share"] == 0.25
    demo = tables.demo_features(table, n=4)
    # a tie in output score goes to the known input score; feature 0's 'apple' repeats feature 2's word
    assert demo["feature"].tolist() == [2, 1]
    assert tables.lens_family(split(" Grower | grower |  seedling | Grow |  growers")) == 4
    assert tables.lens_family(split("benius | ílés")) == 1 and tables.lens_family(split("ílés | benius")) == 0
    words = pd.DataFrame(
        {
            "feature": [0, 1, 2],
            "output_score": [1.0, 0.9, 0.5],
            "input_score": [0.0, 0.2, 0.9],
            "top_tokens": ["benius | ílés | namento", " music | ílés | xx", " piano |  Piano | pianos |  violin"],
            "bottom_tokens": ["", "", ""],
        }
    )
    assert tables.demo_features(words, n=1)["feature"].tolist() == [2]  # the one whose lens spells one word
    assert tables.demo_features(words, n=2)["feature"].tolist() == [0, 1]  # too few such: any word-led feature


class PieceTokenizer:
    """A case-sensitive test tokenizer with leading-space pieces (like GPT-2/SentencePiece), greedy longest match."""

    def __init__(self, pieces):
        self.vocab = {p: i for i, p in enumerate(pieces)}
        self.inv = {i: p for p, i in self.vocab.items()}

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for j in range(len(text), i, -1):
                if text[i:j] in self.vocab:
                    ids.append(self.vocab[text[i:j]])
                    i = j
                    break
            else:
                raise KeyError(text[i])
        return ids

    def decode(self, ids):
        return "".join(self.inv[i] for i in ids)


def test_concept_search_matches_case_and_space_variants():
    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    tok = PieceTokenizer(letters + [" apple", "Apple", " APPLE", "Fr", "ance", " France", " pie"])
    targets = search.concept_tokens("apple", tok)
    assert {"apple"} == set(targets.whole)  # every single-token spelling normalises to 'apple'
    france = search.concept_tokens("France", tok)
    assert "france" in france.whole and "ance" in france.pieces  # 'France' without a space splits
    with pytest.raises(ValueError, match="empty"):
        search.concept_tokens("  ", tok)

    table = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3],
            "output_score": [0.1, 0.3, 0.2, 0.9],
            "input_score": [0.8, 0.1, np.nan, 0.5],
            "top_tokens": [" Apple | pie", " APPLE", "pear", " pie | tart"],
        }
    )
    only_lens = search.search_concept(table, targets)
    assert only_lens["feature"].tolist() == [1, 0]  # ranked by output score
    assert only_lens["lens_matches"].tolist() == [" APPLE", " Apple"]
    assert only_lens["context_share"].isna().all()
    max_tokens = {0: ["apple", "x"], 1: [], 2: [" Apple", " apple", "z", "q"], 3: ["pie"]}
    both = search.search_concept(table, targets, lambda f: max_tokens[f])
    assert both["feature"].tolist() == [1, 2, 0]
    assert both.set_index("feature").loc[2, "context_share"] == 0.5 and both.set_index("feature").loc[0, "context_share"] == 0.5


def test_sweep_measures(tiny_lm):
    targets = sweep.concept_targets(["▁apple", " Apple", ",", "pie", "\n", "a"])
    assert targets == ["apple", "pie"]
    assert sweep.concept_hits("Apple pie, apples and APPLE.", targets) == 2  # distinct targets, whole words
    assert sweep.concept_hits("pineapples", targets) == 0

    prompt, conts = "the king", [" and the queen of france", " the the the the", ""]
    scored = sweep.score_texts(tiny_lm, prompt, conts, targets)
    assert scored["repetition"].tolist()[1] > 0.5 and scored["repetition"].tolist()[0] == 0.0
    assert math.isnan(scored["perplexity"].iloc[2])
    # perplexity equals the direct computation: one full forward, loss on the continuation tokens only
    for cont, ppl in zip(conts[:2], scored["perplexity"].tolist()[:2]):
        prompt_ids = tiny_lm.tokenizer(prompt)["input_ids"]
        cont_ids = tiny_lm.tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + cont_ids])
        with torch.no_grad():
            logits = tiny_lm.model(ids).logits[0].float()
        nll = [-torch.log_softmax(logits[i - 1], -1)[ids[0, i]].item() for i in range(len(prompt_ids), ids.shape[1])]
        assert ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_exports(tiny_sae):
    table = pd.DataFrame({"feature": [0, 1], "output_score": [0.5, np.nan]})
    assert scores_csv(table).decode().splitlines() == ["feature,output_score", "0,0.5", "1,"]
    card = json.loads(card_json({"x": np.float32(1.5), "n": np.int64(3), "nan": float("nan"), "arr": np.arange(2), "df": table}))
    assert card == {"x": 1.5, "n": 3, "nan": None, "arr": [0, 1], "df": [{"feature": 0, "output_score": 0.5}, {"feature": 1, "output_score": None}]}

    blob = steering_vector(tiny_sae, [3, 7], [2.0, -1.0], "additive", "tiny")
    tensors = load_safetensors(blob)
    expected = 2.0 * tiny_sae.sae.W_dec[3] - 1.0 * tiny_sae.sae.W_dec[7]  # plain TopK SAE: direction = W_dec[f]
    torch.testing.assert_close(tensors["vector"], expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tensors["directions"], tiny_sae.sae.W_dec[[3, 7]].float(), rtol=1e-5, atol=1e-6)
    assert tensors["features"].tolist() == [3, 7]
    paper = load_safetensors(steering_vector(tiny_sae, [3], [4.0], "paper"))
    assert "vector" not in paper and paper["strengths"].tolist() == [4.0]
    with pytest.raises(Exception, match="out of range"):
        steering_vector(tiny_sae, [10_000], [1.0], "paper")


# ---------------------------------------------------------------------------------------------------
# AppTest on the tiny fixture


def app(**query):
    """An AppTest of app.py with ``query`` as the URL's query parameters."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / NAV["home"].path), default_timeout=TIMEOUT)
    at.query_params.update(query)
    return at


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(at) -> str:
    """All text the run rendered (markdown, captions, headings, html, alerts), for content checks."""
    parts = []
    for kind in ("markdown", "caption", "title", "header", "subheader", "error", "warning", "info", "success", "html", "text"):
        for el in at.get(kind):
            parts.append(str(getattr(el, "value", "") or getattr(getattr(el, "proto", None), "body", "")))
    return "\n".join(parts)


def test_every_page_renders_through_navigation(fixture_env):
    at = app().run()
    no_exception(at)
    assert "activation is not effect" in texts(at)
    assert any("Test fixture" in w.value for w in at.sidebar.warning)
    for page in [*PAGES, NAV["home"].path]:
        at.switch_page(page).run()
        no_exception(at)
        assert at.title, f"{page} rendered no title"
        assert not at.error, f"{page}: {[e.value for e in at.error]}"


@pytest.mark.parametrize("page", [NAV["home"].path, *PAGES])
def test_each_page_runs_on_its_own(fixture_env, page):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT).run()
    no_exception(at)
    assert at.sidebar.selectbox(key="sb_sae_ref") is not None


def test_the_sidebar_opens_on_the_sae_marked_to_open_and_a_link_still_wins(fixture_env, monkeypatch):
    """The bundled picker starts on the SAE whose preset search found most presets (``SaeChoice.opens``, set by
    ``loaders.sae_choices`` from ``presets.opening_sae``); a layer in the link still decides."""
    from dataclasses import replace

    from saesteer.ui.sources import TinySources

    real = TinySources.sae_choices

    def marked(self, *args, **kwargs):
        return [replace(c, opens=c.layer == 2) for c in real(self, *args, **kwargs)]

    monkeypatch.setattr(TinySources, "sae_choices", marked)
    at = app().run()
    no_exception(at)
    assert at.sidebar.selectbox(key="sb_sae_ref").value == "tiny-topk-L2"
    at = app(layer="3").run()
    assert at.sidebar.selectbox(key="sb_sae_ref").value == "tiny-topk-L3"


def test_zero_input_note_names_the_layers_and_the_share_that_scores():
    def frame(scores):
        return pd.DataFrame({"feature": range(len(scores)), "input_score": scores, "output_score": [0.0] * len(scores)})

    frames = {2: frame([0, 0, 0, 0.5, np.nan]), 5: frame([0, 0, 0.2, 0.3, 0.4]), 8: frame([0.0, 0.0, 0.0, 0.0, 0.1])}
    note = tables.zero_input_note(frames)
    assert note.startswith("The median input score at L2, L8 is 0: only 20%–25% of the scored features")  # NaN is not scored
    assert tables.zero_input_note({5: frames[5]}) is None
    assert "only 25% of" in tables.zero_input_note({2: frames[2]})


def test_layer_picker_switches_sae_and_overview_shows_all_layers(fixture_env):
    at = app().run()
    at.switch_page(NAV["layers"].path).run()
    no_exception(at)
    assert not [i for i in at.info if "median input score" in i.value]  # the fixture's medians are above 0
    charts = at.get("plotly_chart")
    assert len(charts) >= 3  # distributions, shares, scatter
    shares = at.dataframe[0].value
    assert shares["layer"].tolist() == [1, 2, 3]
    picker = at.sidebar.selectbox(key="sb_sae_ref")
    picker.select("tiny-topk-L3").run()
    no_exception(at)
    assert "layer 3" in " ".join(c.value for c in at.sidebar.caption)
    assert any("Layer 3" in s.value for s in at.subheader)
    assert at.query_params["sae"] == ["tiny-topk-L3"] or at.query_params["sae"] == "tiny-topk-L3"


def _select_row(at, key: str, row: int):
    at.session_state[key] = {"selection": {"rows": [row], "columns": [], "cells": []}}
    return at.run()


def test_selecting_a_ranked_row_opens_its_card(fixture_env):
    at = app().run()
    at.switch_page(NAV["features"].path).run()
    no_exception(at)
    by_output = at.dataframe[1].value
    scores = by_output["output_score"].tolist()
    assert scores == sorted(scores, reverse=True)
    feature = int(by_output["feature"].iloc[0])  # the fixture plants its HTML-like context in the top feature
    _select_row(at, "fs_by_output", 0)
    no_exception(at)
    assert at.title[0].value == "Feature card"
    assert at.session_state["feature"] == feature
    assert at.number_input(key="fc_feature").value == feature
    assert any(f"Feature {feature}" in m.value for m in at.markdown)
    html_out = "\n".join(h.proto.body for h in at.get("html"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_out and "<script>" not in html_out
    assert "&lt;img src=x onerror=alert(1)&gt;" in html_out and "<img" not in html_out
    assert {d.label for d in at.get("download_button")} >= {"Feature card (JSON)", "Steering vector (safetensors)"}


def test_paging_and_search_filter_the_tables(fixture_env):
    at = app().run()
    at.switch_page(NAV["features"].path).run()
    at.selectbox(key="fs_page_size").select(25).run()
    at.number_input(key="fs_page").set_value(2).run()
    no_exception(at)
    left = at.dataframe[0].value
    assert left["rank"].tolist() == list(range(26, 51))
    token = at.dataframe[1].value["top_tokens"].iloc[0].split(" | ")[0].strip()
    at.text_input(key="fs_search").input(token).run()
    no_exception(at)
    from saesteer.ui import sources

    expected = tables.filter_features(sources.tiny_feature_data(1).table, search=token)
    page = at.number_input(key="fs_page").value
    assert page == min(2, tables.n_pages(len(expected), 25))  # clamped when fewer pages are left
    want = tables.page_of(tables.ranked(expected, "output_score"), page, 25)["feature"].tolist()
    assert at.dataframe[1].value["feature"].tolist() == want


def test_clicking_a_scatter_point_opens_its_card(fixture_env):
    at = app().run()
    at.switch_page(NAV["layers"].path).run()
    at.session_state["ov_scatter"] = {"selection": {"points": [{"customdata": [42, "x"], "x": 0.5, "y": 0.1}], "point_indices": [0], "box": [], "lasso": []}}
    at.run()
    no_exception(at)
    assert at.title[0].value == "Feature card" and at.session_state["feature"] == 42


def test_steer_button_preselects_the_feature_in_the_lab(fixture_env):
    at = app(feature="7").run()
    at.switch_page(NAV["card"].path).run()
    at.button(key="fc_steer").click().run()
    no_exception(at)
    assert at.title[0].value == "Steering lab"
    assert at.number_input(key="lab_f0").value == 7


def test_lab_streams_the_same_text_as_generate(fixture_env):
    from saesteer.config import SteerParams
    from saesteer.steering import generate, generate_pair
    from saesteer.ui import sources

    at = app(layer="2", feature="11", strength="8").run()
    at.switch_page(NAV["lab"].path).run()
    at.text_area(key="lab_prompt").input("the king of france").run()
    at.button(key="lab_go").click().run()
    no_exception(at)
    last = at.session_state["lab_last"]
    parts = sources.tiny_parts()
    lm, sae = parts["lm"], parts["saes"][2]
    fast = at.checkbox(key="lab_fast").value
    # Both columns come from one 2-row decode: what generate_pair returns for the same settings.
    params = SteerParams(features=(11,), strengths=(8.0,), mode="paper", max_new_tokens=32, temperature=0.7)
    assert (last["baseline"], last["steered"]) == generate_pair(lm, sae, "the king of france", params, fast=fast)
    common = dict(max_new_tokens=32, temperature=0.7, seed=0, fast=fast)  # the lab samples at the paper's 0.7 by default
    assert last["baseline"] == generate(lm, "the king of france", **common)[0]
    assert last["steered"] == generate(lm, "the king of france", sae=sae, features=[11], strengths=[8.0], mode="paper", **common)[0]
    html_out = "\n".join(h.proto.body for h in at.get("html"))
    assert "the king of france" in html_out
    assert ("bf16 copy of the whole model" in texts(at)) == fast


def test_lab_sweep_zero_strength_is_the_baseline(fixture_env):
    from saesteer.steering import generate
    from saesteer.ui import sources

    at = app(layer="1", feature="3").run()
    at.switch_page(NAV["lab"].path).run()
    at.multiselect(key="lab_grid_paper").set_value([0.0, 2.0, 20.0]).run()
    at.button(key="lab_sweep").click().run()
    no_exception(at)
    result = at.session_state["lab_sweep_result"]
    assert result["strength"].tolist() == [0.0, 2.0, 20.0]
    assert (result["perplexity"] > 0).all() and (result["concept_hits"] >= 0).all()
    lm = sources.tiny_parts()["lm"]
    assert result["text"].iloc[0] == generate(lm, at.text_area(key="lab_prompt").value, max_new_tokens=32, temperature=0.7, seed=0)[0]


def test_demo_mode_runs_a_preset(fixture_env):
    at = app().run()
    at.switch_page(NAV["lab"].path).run()
    at.toggle(key="lab_demo").set_value(True).run()
    no_exception(at)
    tries = [b for b in at.button if b.key and b.key.startswith("lab_demo_")]
    assert 1 <= len(tries) <= 4
    tries[0].click().run()
    no_exception(at)
    assert at.session_state["lab_last"]["features"] == (int(tries[0].key.rsplit("_", 1)[1]),)
    assert "activation is not effect" in texts(at)


def test_a_layer_change_leaves_no_text_of_the_old_layer_in_the_lab(fixture_env):
    from saesteer.config import SteerParams
    from saesteer.steering import generate_pair
    from saesteer.ui import sources

    at = app(layer="1", feature="3", strength="4").run()
    at.switch_page(NAV["lab"].path).run()
    at.multiselect(key="lab_grid_paper").set_value([0.0, 2.0]).run()
    at.button(key="lab_sweep").click().run()
    assert "lab_last" in at.session_state and "lab_sweep_result" in at.session_state
    at.selectbox(key="sb_sae_ref").set_value("tiny-topk-L2").run()  # Live is on: the pair restarts at layer 2
    no_exception(at)
    last = at.session_state["lab_last"]
    params = SteerParams(features=(3,), strengths=(4.0,), mode="paper", max_new_tokens=32, temperature=0.7)
    prompt = at.text_area(key="lab_prompt").value
    fast = at.checkbox(key="lab_fast").value
    assert (last["baseline"], last["steered"]) == generate_pair(sources.tiny_parts()["lm"], sources.tiny_parts()["saes"][2], prompt, params, fast=fast)
    assert "lab_sweep_result" not in at.session_state  # the sweep was layer 1's
    at.toggle(key="lab_live").set_value(False).run()
    at.selectbox(key="sb_sae_ref").set_value("tiny-topk-L1").run()
    no_exception(at)
    assert "lab_last" not in at.session_state and "**Baseline** (no steering)" not in texts(at)


@pytest.mark.parametrize("error", ["config", "oom"])
def test_a_failed_calibration_of_the_labs_first_row_falls_back(fixture_env, monkeypatch, error):
    from saesteer import presets
    from saesteer.config import ConfigError

    def failing(*args, **kwargs):
        raise ConfigError("no word to calibrate on") if error == "config" else MemoryError("cannot allocate")

    monkeypatch.setattr(presets, "calibrate", failing)
    monkeypatch.setattr(presets, "feature_strength", failing)
    at = app(layer="1", feature="3").run()
    at.switch_page(NAV["lab"].path).run()
    no_exception(at)
    errors = " ".join(e.value for e in at.error)
    assert ("no word to calibrate on" in errors) if error == "config" else ("Out of memory while finding a fluent strength for feature 3" in errors)
    assert at.slider(key="lab_s0").value == presets.FALLBACK_STRENGTH
    assert any("Using amp" in w.value for w in at.warning)


def test_concept_search_lists_features_by_output_score(fixture_env):
    at = app().run()
    at.switch_page(NAV["concepts"].path).run()
    at.text_input(key="cs_concept").input("king").run()
    no_exception(at)
    if at.dataframe:
        result = at.dataframe[0].value
        assert result["output_score"].tolist() == sorted(result["output_score"].tolist(), reverse=True)
        assert (result["lens_hits"] > 0).any() or (result["context_share"] > 0).any()
    else:
        assert at.warning


def test_query_params_reproduce_the_view(fixture_env):
    at = app(layer="2", feature="5", prompt="the queen", strength="3", mode="additive").run()
    no_exception(at)
    assert at.sidebar.selectbox(key="sb_sae_ref").value == "tiny-topk-L2"
    at.switch_page(NAV["card"].path).run()
    assert at.number_input(key="fc_feature").value == 5
    at.switch_page(NAV["lab"].path).run()
    no_exception(at)
    assert at.text_area(key="lab_prompt").value == "the queen"
    assert at.radio(key="lab_mode").value == "additive"
    assert at.slider(key="lab_s0").value == 3.0
    qp = {k: (v[-1] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert qp["layer"] == "2" and qp["feature"] == "5" and qp["prompt"] == "the queen" and qp["mode"] == "additive"


def test_bad_query_params_are_refused_with_a_message(fixture_env):
    at = app(sae="/etc", feature="abc", strength="1e9", layer="9").run()
    no_exception(at)
    warnings = " ".join(w.value for w in at.sidebar.warning)
    assert "outside the allowed folders" in warnings
    assert "'feature' ignored" in warnings and "'strength' ignored" in warnings
    assert "no SAE at layer 9" in warnings
    assert at.sidebar.selectbox(key="sb_sae_ref").value == "tiny-topk-L1"  # default kept


def test_out_of_range_feature_is_reported(fixture_env):
    at = app(feature="100000").run()
    at.switch_page(NAV["card"].path).run()
    no_exception(at)
    assert any("does not exist" in e.value for e in at.error)


def test_unreachable_hub_model_is_an_error_not_a_crash(real_mode):
    at = app(model="nonexistent-org/no-such-model").run()
    no_exception(at)
    assert any("Could not load the model" in e.value and "no-such-model" in e.value for e in at.sidebar.error)
    for page in PAGES:
        at.switch_page(page).run()
        no_exception(at)
        assert at.error  # every page says why it cannot show anything


def test_sae_load_errors_are_errors_not_crashes(real_mode, monkeypatch, tiny_lm, tmp_path):
    from saesteer.testing import make_tiny_sae
    from saesteer.ui import loaders

    monkeypatch.setattr(loaders, "load_model", lambda spec: tiny_lm)
    narrow, good = tmp_path / "narrow", tmp_path / "good"
    make_tiny_sae(d_in=32, layer=1).sae.save_model(str(narrow))
    make_tiny_sae(d_in=64, layer=3).sae.save_model(str(good))

    at = app().run()
    no_exception(at)
    assert at.sidebar.error  # bundled SAEs for the embedded model are missing here or do not fit the tiny model

    at.sidebar.radio(key="sb_sae_source").set_value("release").run()
    at.sidebar.text_input(key="sb_release").input("no-such-release").run()
    no_exception(at)
    assert any("unknown sae-lens release" in e.value for e in at.sidebar.error)

    at.sidebar.radio(key="sb_sae_source").set_value("local").run()
    at.sidebar.text_input(key="sb_sae_path").input(str(tmp_path / "missing")).run()
    no_exception(at)
    assert any("not an sae-lens SAE directory" in e.value for e in at.sidebar.error)

    at.sidebar.text_input(key="sb_sae_path").input(str(narrow)).run()
    no_exception(at)
    assert any("d_in=32" in e.value for e in at.sidebar.error)

    at.sidebar.text_input(key="sb_sae_path").input(str(good)).run()
    no_exception(at)
    assert not at.sidebar.error
    assert "layer 3" in " ".join(c.value for c in at.sidebar.caption)
    at.switch_page(NAV["features"].path).run()
    no_exception(at)
    assert any("No feature scores" in i.value for i in at.info)
    assert at.button(key="cp_start")


def test_feature_scores_are_computed_in_the_background_and_cached(real_mode, monkeypatch, tiny_lm, tmp_path):
    """An SAE without feature data: the page offers to compute it; the job runs in a thread (so the user may
    leave), writes to the on-disk cache, and the next run loads the result from there."""
    import time

    from saesteer.testing import make_tiny_sae

    from saesteer.ui import loaders

    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loaders, "load_model", lambda spec: tiny_lm)
    sae_dir = tmp_path / "sae"
    make_tiny_sae(d_in=64, layer=2, seed=5).sae.save_model(str(sae_dir))

    at = app().run()
    at.sidebar.radio(key="sb_sae_source").set_value("local").run()
    at.sidebar.text_input(key="sb_sae_path").input(str(sae_dir)).run()
    at.switch_page(NAV["features"].path).run()
    at.select_slider(key="cp_tokens").set_value(20_000).run()
    at.button(key="cp_start").click().run()
    no_exception(at)
    assert at.get("progress") or at.success  # a progress bar while the job runs

    job = next(j for j in loaders.jobs().all() if str(j.target).startswith(str(tmp_path)))
    deadline = time.time() + 300
    while job.running and time.time() < deadline:
        time.sleep(0.5)
    assert job.done, job.error
    assert (job.target / "meta.json").exists() and str(job.target).startswith(str(tmp_path / "cache"))

    at.run()
    no_exception(at)
    assert at.dataframe and len(at.dataframe[1].value) == 50  # the ranked tables are there
    from saesteer.features import FeatureData

    saved = FeatureData.load(job.target)
    assert len(saved.table) == 128 and saved.table["output_score"].notna().all()


@pytest.mark.slow
def test_lab_on_the_embedded_model(real_mode, tmp_path, monkeypatch):
    """The real Gemma 3 270M through the app's own loaders: the lab streams a short steered continuation.
    With no bundled SAE installed, a random sae-lens TopK SAE (d_in 640, random weights, not trained) is
    loaded from a local directory instead."""
    from saesteer.testing import make_tiny_sae

    from saesteer.saes import list_bundled
    from saesteer.steering import generate
    from saesteer.ui import loaders

    at = app(prompt="The capital of France is", strength="2").run()
    if not list_bundled():
        sae_dir = tmp_path / "random-sae"
        make_tiny_sae(d_in=640, d_sae=256, layer=5, k=16).sae.save_model(str(sae_dir))
        at.sidebar.radio(key="sb_sae_source").set_value("local").run()
        at.sidebar.text_input(key="sb_sae_path").input(str(sae_dir)).run()
    no_exception(at)
    assert not at.sidebar.error, [e.value for e in at.sidebar.error]
    assert "gemma-3-270m" in " ".join(c.value for c in at.sidebar.caption)
    at.switch_page(NAV["lab"].path).run()
    at.slider(key="lab_max_new").set_value(6).run()
    at.button(key="lab_go").click().run(timeout=300)
    no_exception(at)
    last = at.session_state["lab_last"]
    lm = loaders.load_model(ModelSpec())
    fast = at.checkbox(key="lab_fast").value
    # the baseline is row 0 of a 2-row decode (row 1 steered); with fast decode, compare with the same batch shape
    assert last["baseline"] == generate(lm, ["The capital of France is"] * 2, max_new_tokens=6, fast=fast, temperature=0.7, seed=[0, 0])[0]
    assert last["steered"]


def test_demo_mode_where_the_preset_search_found_none_offers_none_and_says_why(fixture_env, monkeypatch):
    from saesteer import presets
    from saesteer.ui.pages import lab

    reason = "no preset at layer 1: 0 of the 3 candidates calibrated (of 3: concepts from the concept list) say their word in the lab's setting"
    monkeypatch.setattr(lab, "_defaults", lambda ctx: presets.Defaults("search", reason, None, ()))
    at = app().run()
    at.switch_page(NAV["lab"].path).run()
    at.toggle(key="lab_demo").set_value(True).run()
    no_exception(at)
    assert not [b for b in at.button if b.key and b.key.startswith("lab_demo_")]
    assert any(i.value == "N" + reason[1:] + "." for i in at.info), [i.value for i in at.info]
