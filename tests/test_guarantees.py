"""The README's guarantees: concurrent sessions, bad input, safe loading, HTML escaping, killed jobs.

Each guarantee and the tests that check it. ``input::`` is ``tests/test_bad_input.py`` (bad input, point 2,
lives there); tests in other files are named by file. Where a per-module test already covers a case
thoroughly it is referenced rather than repeated.

| point | case | CLI | app | library |
|---|---|---|---|---|
| 1 concurrency | four concurrent steered generations = their solo outputs, no hooks leak | | ``test_two_app_sessions_steer_one_shared_model_independently`` | ``test_concurrent_sessions_get_their_solo_results_and_leave_no_hooks``; test_steering.py::``test_concurrent_threads_do_not_see_each_others_hooks``, ``test_stream_closed_early_releases_lock_and_hooks`` |
| 2 bad input | layer with no SAE | input::``test_cli_sae_errors_are_one_line[*-no-sae-at-layer]`` | input::``test_app_bad_link_parameters_are_refused_with_a_message[layer-without-sae]``, ``[unknown-sae]`` | test_saes.py::``test_load_bundled_through_manifest`` |
| | feature id out of range / negative / not an integer | test_cli.py::``test_steer_bad_input_is_one_clear_line``; input::``test_cli_sae_errors_are_one_line[feature-beyond-width]`` | input::``test_app_feature_beyond_the_sae_is_an_error_on_the_card``, ``test_app_feature_beyond_the_sae_is_an_error_in_the_lab``, ``test_app_bad_link_parameters_are_refused_with_a_message[negative-feature, text-feature, fractional-feature]``, ``test_app_widgets_keep_values_within_bounds`` | test_saes.py::``test_check_feature`` |
| | strength NaN / inf / absurdly large (bounded at 1000) | test_cli.py::``test_steer_bad_input_is_one_clear_line`` | input::``test_app_bad_link_parameters_are_refused_with_a_message[nan-, inf-, huge-strength]``, ``test_app_non_finite_strength_in_the_session_is_refused_with_a_message``, ``test_app_widgets_keep_values_within_bounds`` | test_steering.py::``test_generate_rejects_bad_input`` |
| | empty prompt / prompt + new tokens beyond the model's context (never above 2048 prompt tokens) | test_cli.py::``test_steer_empty_prompt``; input::``test_cli_prompt_beyond_the_context_and_too_many_new_tokens`` | input::``test_app_empty_and_over_long_prompts_are_errors``, ``test_app_bad_link_parameters_are_refused_with_a_message[over-long-prompt]`` | test_steering.py::``test_generate_rejects_bad_input``; input::``test_prompt_limit_is_the_context_minus_the_new_tokens`` |
| | max_new_tokens <= 0 or huge | test_cli.py::``test_steer_bad_input_is_one_clear_line``; input::``test_cli_prompt_beyond_the_context_and_too_many_new_tokens`` | input::``test_app_widgets_keep_values_within_bounds`` | test_steering.py::``test_generate_rejects_bad_input`` |
| | SAE d_in differs from the model width | input::``test_cli_sae_errors_are_one_line[d_in-mismatch]`` | test_app.py::``test_sae_load_errors_are_errors_not_crashes`` | test_saes.py::``test_d_in_mismatch_is_refused`` |
| | hook name that maps to no module | input::``test_cli_sae_errors_are_one_line[hook-maps-to-no-module]`` | input::``test_app_sae_hook_that_maps_to_no_module_is_an_error`` | test_saes.py::``test_hook_name_that_maps_to_no_module`` |
| | unknown sae-lens release or id | input::``test_cli_sae_errors_are_one_line[unknown-release, unknown-sae-id]`` | test_app.py::``test_sae_load_errors_are_errors_not_crashes``; input::``test_app_unknown_sae_id_in_a_link_and_an_unreachable_hub`` | test_saes.py::``test_unknown_release_and_id_fail_without_network`` |
| | unreachable hub (model, SAE download) | input::``test_cli_unreachable_hub_model_is_one_line``, ``test_cli_sae_errors_are_one_line[unreachable-hub-sae]`` | test_app.py::``test_unreachable_hub_model_is_an_error_not_a_crash``; input::``test_app_unknown_sae_id_in_a_link_and_an_unreachable_hub`` | test_models.py::``test_hub_id_offline_names_the_embedded_default`` |
| | Gemma Scope 2 SAE offline and not cached; unknown Gemma Scope 2 id | test_gemmascope.py::``test_cli_scores_a_subset_of_a_gemma_scope_sae_offline`` | test_app_gemmascope.py::``test_offline_pick_gives_one_clear_message_and_the_app_stays_up``, ``test_unknown_id_in_a_link_is_refused_with_a_message`` | test_gemmascope.py::``test_offline_and_not_cached_is_one_clear_message_without_a_connection``, ``test_unreachable_hub_without_offline_mode_is_the_same_message``, ``test_unknown_release_and_id_are_named`` |
| | scoring run above the confirmed cost or beyond the available memory; subset ids outside the SAE | | test_app_gemmascope.py::``test_a_run_above_the_confirmed_cost_is_refused``, ``test_scoring_a_subset_of_a_release_sae_uses_the_background_job_and_cache`` | test_gemmascope.py::``test_cost_is_measured_and_a_run_above_the_confirmed_cost_is_refused``, ``test_subsets_are_refused_where_latents_compete_and_ids_are_checked`` |
| | corrupted / truncated cache or parquet file | input::``test_cli_damaged_cache_is_recomputed_to_the_same_result``, ``test_cli_damaged_feature_data_parquet_is_one_line`` | input::``test_app_damaged_feature_data_is_an_error_and_can_be_recomputed`` | test_store.py::``test_corrupted_file_is_recomputed``, ``test_truncated_parquet_and_missing_sidecar_are_recomputed`` |
| | read-only cache directory | input::``test_cli_read_only_cache_computes_without_caching`` | input::``test_app_read_only_cache_keeps_computed_scores_in_memory`` | test_store.py::``test_unwritable_root_falls_back_to_computing`` |
| | out of memory: fall back, else say what to reduce | input::``test_cli_scores_out_of_memory_falls_back_or_says_what_to_do``, ``test_cli_eval_generation_out_of_memory_falls_back_to_the_same_texts`` | input::``test_app_out_of_memory_in_a_feature_job_is_an_error_not_a_crash``, ``test_app_out_of_memory_in_the_lab_is_an_error_not_a_crash`` (stream and sweep) | input::``test_output_scores_fall_back_to_smaller_batches``, ``test_out_of_memory_at_batch_one_is_a_clear_error_and_other_errors_pass_through``, ``test_continuation_nll_falls_back_to_smaller_batches`` |
| 3 safe loading | weights only from safetensors / GGUF; no pickle; torch.load weights-only | (the library's loaders) | (the library's loaders) | ``test_no_unpickling_in_the_code``, ``test_model_weights_come_only_from_safetensors``, ``test_torch_load_refuses_pickled_code_once_saesteer_loads`` |
| | trust_remote_code off unless the user turns it on | ``test_trust_remote_code_is_off_unless_asked`` | ``test_app_never_turns_on_remote_code`` | ``test_trust_remote_code_is_off_unless_asked`` |
| | paths from the URL or the UI confined to allowed roots | | ``test_sidebar_paths_are_confined_to_allowed_roots``; test_app.py::``test_query_params_validation``, ``test_paths_resolve_symlinks_before_confinement``; input::``test_app_bad_link_parameters_are_refused_with_a_message[path-outside-roots]`` | |
| 4 HTML | prompts and contexts escaped; shown literally, no script runs in a real browser; tokens in Markdown also have Markdown syntax neutralised | | ``test_html_like_prompts_and_contexts_are_escaped`` (AppTest), ``test_demo_preset_tokens_are_escaped_as_html_and_markdown``; test_browser.py::``test_html_like_prompt_and_contexts_show_literally_in_chromium`` (real Chromium) | test_app.py::``test_context_html_escapes_every_token``, test_plots.py (escaped hover text) |
| 5 faults | a scoring job killed midway (SIGKILL) resumes; final results = an uninterrupted run | ``test_killed_scoring_job_resumes_and_equals_an_uninterrupted_run`` | | test_store.py::``test_resume_per_chunk_equals_uninterrupted_run`` |
"""

from __future__ import annotations

import ast
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_app import XSS, app, no_exception

from saesteer import features as features_mod
from saesteer.config import ModelSpec, SaeSpec, ScoreParams, SteerParams
from saesteer.models import ModelLoadError, load_model
from saesteer.paths import CACHE_ENV
from saesteer.saes import load_sae
from saesteer.scores import output_scores
from saesteer.steering import generate, generate_pair, stream
from saesteer.testing import WORDS, make_tiny_sae
from saesteer.ui.nav import PAGES as NAV

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the king of france", "my love", "from my experience , the city is", "once i heard about the sea"]


def assert_no_hooks(lm) -> None:
    for name, module in lm.model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'model'}"


def assert_lock_free(lm) -> None:
    got: list[bool] = []
    other = threading.Thread(target=lambda: got.append(lm.lock.acquire(timeout=30) and lm.lock.release() is None))
    other.start()
    other.join()
    assert got == [True], "the model's lock is still held"


# ---------------------------------------------------------------------------------------------------
# 1. Concurrency


def test_concurrent_sessions_get_their_solo_results_and_leave_no_hooks(tiny_lm):
    """Four steering sessions (two streaming like the app, one baseline/steered pair like the CLI, one batched
    sweep with per-row strengths) and a background scoring job share one model: each gets exactly what it gets
    alone (greedy), repeatedly, and nothing stays attached afterwards."""
    saes = [make_tiny_sae(seed=30 + i) for i in range(4)]
    p0 = SteerParams(features=(5,), strengths=(8.0,), max_new_tokens=12)
    p1 = SteerParams(features=(17, 3), strengths=(40.0, -60.0), mode="additive", max_new_tokens=12)
    p2 = SteerParams(features=(99,), strengths=(20.0,), max_new_tokens=12)
    sweep = torch.tensor([[0.0], [4.0], [-8.0]])
    jobs = [
        lambda: "".join(stream(tiny_lm, PROMPTS[0], sae=saes[0], params=p0)),
        lambda: "".join(stream(tiny_lm, PROMPTS[1], sae=saes[1], params=p1)),
        lambda: generate_pair(tiny_lm, saes[2], PROMPTS[2], p2),
        lambda: generate(tiny_lm, [PROMPTS[3]] * 3, sae=saes[3], features=[7], strengths=sweep, max_new_tokens=12),
        lambda: output_scores(tiny_lm, saes[0], ScoreParams(batch_size=16), features=np.arange(48)).score.tolist(),
    ]
    alone = [job() for job in jobs]
    assert len({repr(a) for a in alone}) == len(jobs)
    assert alone[0] != generate(tiny_lm, PROMPTS[0], max_new_tokens=12)[0]  # the steering really changes the text
    results: dict[int, list] = {i: [] for i in range(len(jobs))}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[i].append(jobs[i]())
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(len(jobs)):
        assert results[i] == [alone[i]] * 3, f"job {i} was disturbed by the others"
    assert_no_hooks(tiny_lm)
    assert_lock_free(tiny_lm)


def test_two_app_sessions_steer_one_shared_model_independently(fixture_env):
    """Two AppTest sessions, run from two threads, share the cached tiny model (st.cache_resource) and click
    Generate at the same time with their own feature, strength, mode and prompt."""
    from saesteer.ui import sources

    views = [
        {"layer": "2", "feature": "11", "strength": "8", "prompt": "the king of france"},
        {"layer": "2", "feature": "3", "strength": "-60", "mode": "additive", "prompt": "my love"},
    ]
    sessions = [app(**v).run() for v in views]
    for at in sessions:
        at.switch_page(NAV["lab"].path).run()
        no_exception(at)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def click(at) -> None:
        try:
            start.wait()
            at.button(key="lab_go").click().run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=click, args=(at,)) for at in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    parts = sources.tiny_parts()
    lm, sae = parts["lm"], parts["saes"][2]
    for at, view in zip(sessions, views):
        no_exception(at)
        last = at.session_state["lab_last"]
        fast = at.checkbox(key="lab_fast").value
        common = dict(max_new_tokens=32, temperature=0.7, seed=0, fast=fast, mode=view.get("mode", "paper"))
        assert last["prompt"] == view["prompt"]
        assert last["steered"] == generate(lm, view["prompt"], sae=sae, features=[int(view["feature"])], strengths=[float(view["strength"])], **common)[0]
        assert last["baseline"] == generate(lm, view["prompt"], **{**common, "mode": "paper"})[0]
    assert sessions[0].session_state["lab_last"]["steered"] != sessions[1].session_state["lab_last"]["steered"]
    assert_no_hooks(lm)
    assert_lock_free(lm)


# ---------------------------------------------------------------------------------------------------
# 3. Safe loading


SOURCES = [*sorted((ROOT / "src").rglob("*.py")), ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")),
           *sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]


def _unsafe(source: str, where: str) -> list[str]:
    """Ways ``source`` could unpickle or run downloaded code: pickle-family imports, torch.load without
    weights_only=True, numpy/pandas pickles, trust_remote_code set to anything but the user's choice."""
    problems = []
    user_choice = ("False", "spec.trust_remote_code", "args.trust_remote_code")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad = [n for n in names if n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal")]
            if bad:
                problems.append(f"{where}:{node.lineno} imports {bad}")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kwargs = {kw.arg: ast.unparse(kw.value) for kw in node.keywords if kw.arg}
            if func.split(".")[-1] == "load" and "torch" in func and kwargs.get("weights_only") != "True":
                problems.append(f"{where}:{node.lineno} {func} without weights_only=True")
            if func.split(".")[-1] in ("read_pickle", "to_pickle"):
                problems.append(f"{where}:{node.lineno} {func}")
            if kwargs.get("allow_pickle", "False") != "False":
                problems.append(f"{where}:{node.lineno} {func}(allow_pickle={kwargs['allow_pickle']})")
            if kwargs.get("trust_remote_code", "False") not in user_choice:
                problems.append(f"{where}:{node.lineno} {func}(trust_remote_code={kwargs['trust_remote_code']})")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and ast.unparse(value) not in user_choice:
                    problems.append(f"{where}:{node.lineno} trust_remote_code={ast.unparse(value)}")
    return problems


def test_no_unpickling_in_the_code():
    """No pickle, joblib or dill; torch.load only with weights_only=True; numpy never allows pickles; no code
    path turns trust_remote_code on by itself."""
    bad = ("import pickle\ntorch.load(f)\nnp.load(f, allow_pickle=True)\nAuto.from_pretrained(x, trust_remote_code=True)\n"
           "kw = {'trust_remote_code': True}\npd.read_pickle(p)\n")
    assert len(_unsafe(bad, "example")) == 6  # the check finds what it looks for
    problems = [p for path in SOURCES for p in _unsafe(path.read_text(), str(path.relative_to(ROOT)))]
    assert not problems, problems


class _Payload:
    """Pickled, it runs ``_ran.append`` when unpickled: what a malicious weights file would do."""

    def __reduce__(self):
        return (_ran.append, ("code ran",))


_ran: list[str] = []


def test_torch_load_refuses_pickled_code_once_saesteer_loads(tiny_lm, tmp_path, monkeypatch):
    """Loading a model or SAE makes every torch.load in the process weights-only, also third-party calls that
    ask for weights_only=False (some sae-lens release loaders call torch.load without saying)."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)  # restored after the test
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a hostile environment
    make_tiny_sae(layer=1).sae.save_model(str(tmp_path / "sae"))
    load_sae(SaeSpec(source="local", path=str(tmp_path / "sae")), tiny_lm)
    torch.save({"weights": torch.ones(2), "payload": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(tmp_path / "evil.pt", weights_only=False)
    assert _ran == []
    torch.save({"w": torch.arange(3)}, tmp_path / "plain.pt")
    assert torch.equal(torch.load(tmp_path / "plain.pt")["w"], torch.arange(3))  # plain tensors still load


def test_model_weights_come_only_from_safetensors(tiny_lm, tmp_path):
    d = tmp_path / "pickled-model"
    tiny_lm.model.config.save_pretrained(d)
    tiny_lm.tokenizer.save_pretrained(d)
    torch.save(tiny_lm.model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no safetensors weights: saesteer loads weights only from safetensors"):
        load_model(ModelSpec(name=str(d), device="cpu"))


@pytest.fixture
def record_from_pretrained(monkeypatch, tiny_lm):
    """transformers' loaders replaced by recorders: the tokenizer loads, the model fails like an unreachable hub."""
    import transformers

    seen: list[tuple[str, dict]] = []

    def tokenizer(source, **kwargs):
        seen.append(("tokenizer", kwargs))
        return tiny_lm.tokenizer

    def model(source, **kwargs):
        seen.append(("model", kwargs))
        raise OSError("offline (test)")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    return seen


def test_trust_remote_code_is_off_unless_asked(record_from_pretrained, capsys):
    from saesteer.__main__ import main

    seen = record_from_pretrained

    def last_load() -> dict[str, dict]:
        got = dict(seen[-2:])
        seen.clear()
        return got

    with pytest.raises(ModelLoadError):
        load_model(ModelSpec(name="some-org/some-model", device="cpu"))
    got = last_load()
    assert got["tokenizer"]["trust_remote_code"] is False and got["model"]["trust_remote_code"] is False
    assert got["model"]["use_safetensors"] is True
    assert main(["info", "--model", "some-org/some-model", "--device", "cpu"]) == 2
    assert {k: v["trust_remote_code"] for k, v in last_load().items()} == {"tokenizer": False, "model": False}
    assert main(["info", "--model", "some-org/some-model", "--device", "cpu", "--trust-remote-code"]) == 2
    got = last_load()
    assert {k: v["trust_remote_code"] for k, v in got.items()} == {"tokenizer": True, "model": True}  # only when asked
    assert got["model"]["use_safetensors"] is True
    capsys.readouterr()


def test_app_never_turns_on_remote_code(real_mode, monkeypatch):
    import saesteer.models as models_mod

    specs: list[ModelSpec] = []

    def fake(spec):
        specs.append(spec)
        raise ModelLoadError("offline (test)")

    monkeypatch.setattr(models_mod, "load_model", fake)
    at = app(model="some-org/some-model").run()
    no_exception(at)
    assert specs and all(s.trust_remote_code is False for s in specs)
    assert not [w for w in at.sidebar.checkbox if "remote" in w.label.lower()]
    assert not [w for w in at.sidebar.toggle if "remote" in w.label.lower()]


def test_sidebar_paths_are_confined_to_allowed_roots(real_mode, monkeypatch, tiny_lm, tmp_path):
    """A directory typed into the sidebar must lie inside the assets, the cache or $SAESTEER_ALLOWED_ROOTS;
    symlinks and '..' are resolved first."""
    from saesteer.ui import loaders

    monkeypatch.setattr(loaders, "load_model", lambda spec: tiny_lm)
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    monkeypatch.setenv("SAESTEER_ALLOWED_ROOTS", str(allowed))
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    make_tiny_sae(layer=2).sae.save_model(str(outside / "sae"))
    make_tiny_sae(layer=3).sae.save_model(str(allowed / "sae"))
    (allowed / "link").symlink_to(outside / "sae")

    at = app().run()
    at.sidebar.radio(key="sb_sae_source").set_value("local").run()
    for path in (outside / "sae", allowed / "link", allowed / ".." / "outside" / "sae", Path("/etc")):
        at.sidebar.text_input(key="sb_sae_path").input(str(path)).run()
        no_exception(at)
        assert any("outside the allowed folders" in e.value and "SAESTEER_ALLOWED_ROOTS" in e.value for e in at.sidebar.error), path
    at.sidebar.text_input(key="sb_sae_path").input(str(allowed / "sae")).run()
    no_exception(at)
    assert not at.sidebar.error and "layer 3" in " ".join(c.value for c in at.sidebar.caption)

    for kind, name in (("local", str(outside)), ("hub", "/etc"), ("hub", "../outside")):
        at.sidebar.radio(key="sb_model_kind").set_value(kind).run()
        at.sidebar.text_input(key="sb_model_name").input(name).run()
        no_exception(at)
        assert any("Could not load the model" in e.value and "outside the allowed folders" in e.value for e in at.sidebar.error), name


# ---------------------------------------------------------------------------------------------------
# 4. HTML


def test_html_like_prompts_and_contexts_are_escaped(fixture_env):
    """What the app hands to the browser as HTML: the prompt in the steering lab and the top contexts on the
    feature card (the fixture plants HTML-like tokens in the top feature's contexts). The real-browser check
    is test_browser.py::test_html_like_prompt_and_contexts_show_literally_in_chromium."""
    prompt = f"{XSS[0]} and {XSS[1]}"
    at = app(prompt=prompt, layer="2").run()
    at.switch_page(NAV["lab"].path).run()
    assert at.text_area(key="lab_prompt").value == prompt
    at.button(key="lab_go").click().run()
    no_exception(at)
    html_out = "\n".join(h.proto.body for h in at.get("html"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt; and &lt;img src=x onerror=alert(1)&gt;" in html_out
    assert "<script" not in html_out and "<img" not in html_out
    from saesteer.ui.session import FEATURE
    from saesteer.ui.sources import tiny_feature_data

    at.session_state[FEATURE] = tiny_feature_data(2).planted_feature  # the lab hands its own default feature on
    at.switch_page(NAV["card"].path).run()  # the feature whose contexts are planted
    no_exception(at)
    html_out = "\n".join(h.proto.body for h in at.get("html"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_out and "&lt;img src=x onerror=alert(1)&gt;" in html_out
    assert "<script" not in html_out and "<img" not in html_out


def test_demo_preset_tokens_are_escaped_as_html_and_markdown(fixture_env, monkeypatch):
    """Tokens placed into Markdown (the demo presets of the steering lab) go through ``md_token``: HTML-escaped
    and with Markdown syntax (links, emphasis) neutralised, so a token cannot render as a link or markup."""
    from saesteer.ui.pages import lab
    from saesteer.ui.render import md_token

    tokens = ["[click](http://evil.example)", "**bold**", XSS[1]]
    preset = pd.DataFrame({"feature": [3], "top_tokens": [" | ".join(tokens)], "output_score": [0.5], "input_score": [float("nan")],
                           "strength": [2.0], "evidence": [""]})
    monkeypatch.setattr(lab, "demo_rows", lambda ctx: preset)
    at = app().run()
    at.switch_page(NAV["lab"].path).run()
    at.toggle(key="lab_demo").set_value(True).run()
    no_exception(at)
    shown = [m.value for m in at.markdown]
    assert f"**Feature 3** — the {md_token(tokens[0])} feature" in shown
    assert any(("use words like " + ", ".join(md_token(t) for t in tokens)) in m for m in shown)
    assert not any("[click](" in m or "**bold**" in m or "<img" in m for m in shown)


# ---------------------------------------------------------------------------------------------------
# 5. Faults: kill a scoring job midway, rerun it


# Runs `python -m saesteer scores ...` (argv); once the first chunk of output scores is on disk it says so on
# stdout and waits to be killed, before the next chunk starts.
_STOP_AFTER_FIRST_CHUNK = """
import sys, time
from saesteer import store
from saesteer.__main__ import main

argv = sys.argv[1:]
save = store.Store.save_arrays

def save_and_wait(self, key, name, arrays, compress=True):
    saved = save(self, key, name, arrays, compress)
    if name.startswith("output/"):
        print("FIRST-CHUNK-SAVED", name, flush=True)
        time.sleep(600)
    return saved

store.Store.save_arrays = save_and_wait
sys.exit(main(argv))
"""


def test_killed_scoring_job_resumes_and_equals_an_uninterrupted_run(tiny_lm, tmp_path, monkeypatch, capsys):
    from saesteer.__main__ import main

    model, sae_dir, corpus, cache = tmp_path / "model", tmp_path / "sae", tmp_path / "corpus.txt", tmp_path / "cache"
    tiny_lm.model.save_pretrained(model)
    tiny_lm.tokenizer.save_pretrained(model)
    make_tiny_sae(d_sae=4 * features_mod.OUTPUT_CHUNK, layer=2, seed=40).sae.save_model(str(sae_dir))  # four chunks
    rng = np.random.default_rng(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS, 30)) for _ in range(40)))
    args = ["scores", "--model", str(model), "--sae", str(sae_dir), "--corpus", str(corpus), "--tokens", "600",
            "--context-size", "32", "--device", "cpu"]

    env = {**os.environ, CACHE_ENV: str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    log = tmp_path / "killed-job.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _STOP_AFTER_FIRST_CHUNK, *args, "--out", str(tmp_path / "killed.parquet")],
                                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        # readline blocks until the job reports its first chunk, or returns "" once the job has ended
        while (line := proc.stdout.readline()) and not line.startswith("FIRST-CHUNK-SAVED"):
            pass
        assert line, f"the job ended before its first chunk: {log.read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert not (tmp_path / "killed.parquet").exists()
    chunks = sorted(p.name for p in cache.rglob("output/*.npz"))
    C = features_mod.OUTPUT_CHUNK
    assert chunks == [f"00000000-{C:08d}.npz"]  # killed midway: one of four chunks done

    # Rerun in this process: the corpus pass and the logit lens come from the cache, only the three missing
    # chunks are computed.
    monkeypatch.setenv("SAESTEER_CACHE", str(cache))
    computed: list[int] = []
    real = features_mod.output_scores

    def counting(*a, **k):
        computed.append(int(k["features"][0]))
        return real(*a, **k)

    def not_again(*a, **k):
        raise AssertionError("recomputed although the killed run had cached it")

    monkeypatch.setattr(features_mod, "output_scores", counting)
    monkeypatch.setattr(features_mod, "activation_pass", not_again)
    monkeypatch.setattr(features_mod, "logit_lens", not_again)
    assert main([*args, "--out", str(tmp_path / "resumed.parquet")]) == 0
    assert computed == [C, 2 * C, 3 * C]
    monkeypatch.undo()

    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "other-cache"))
    assert main([*args, "--no-cache", "--out", str(tmp_path / "uninterrupted.parquet")]) == 0
    resumed, clean = pd.read_parquet(tmp_path / "resumed.parquet"), pd.read_parquet(tmp_path / "uninterrupted.parquet")
    assert len(clean) == 4 * C and clean["output_score"].notna().all() and clean["density"].notna().all()
    pd.testing.assert_frame_equal(resumed, clean, check_exact=True)
    capsys.readouterr()
