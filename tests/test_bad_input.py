"""Bad input (guarantee 2 of the README) gets one clear message in the CLI and in the app, and the app stays up.

The map from each case to its tests is in the docstring of ``tests/test_guarantees.py``. CLI runs go through
the in-process entry point (``saesteer.__main__.main``) with the tiny model standing in for the real one; app
runs use AppTest, on the tiny fixture or on the real loaders with the tiny model patched in. Nothing is
downloaded: the hub is forced offline.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings

import huggingface_hub.constants as hub_constants
import numpy as np
import pandas as pd
import pytest
import torch
from test_app import app, no_exception

from saesteer import models, paths
from saesteer import scores as scores_mod
from saesteer.__main__ import main
from saesteer.config import EMBEDDED_MODEL, ConfigError, ScoreParams, SteerParams
from saesteer.corpus import Doc
from saesteer.evaluation import continuation_nll
from saesteer.hookpoints import tl_hook_name
from saesteer.memory import OutOfMemory, for_each_batch, is_out_of_memory
from saesteer.scores import output_scores
from saesteer.steering import encode_prompts, generate, stream, stream_pair
from saesteer.testing import WORDS, make_tiny_model, make_tiny_sae
from saesteer.ui.nav import PAGES as NAV

RELEASE = "gemma-scope-2b-pt-res-canonical"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cli(tiny_lm, tmp_path, monkeypatch, offline):
    """A bundled tiny TopK SAE at layer 2 for the embedded model's name, the model loader returning the tiny
    model (its calls counted), the feature cache in tmp_path, and local SAE directories that do not fit."""
    root = tmp_path / "saes"
    make_tiny_sae(layer=2).sae.save_model(root / EMBEDDED_MODEL / "L2")
    entry = {"id": "tiny-L2", "layer": 2, "width": 128, "hook": tl_hook_name(2), "dir": "L2", "metrics": {}}
    (root / EMBEDDED_MODEL / "manifest.json").write_text(json.dumps({"saes": [entry]}))
    monkeypatch.setattr(paths, "BUNDLED_SAES", root)
    calls: list = []
    monkeypatch.setattr(models, "load_model", lambda spec=None: calls.append(spec) or tiny_lm)
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    make_tiny_sae(d_in=32, layer=2).sae.save_model(tmp_path / "narrow")
    mlp = make_tiny_sae(layer=2)
    mlp.sae.cfg.metadata.hook_name = "blocks.2.hook_mlp_out"
    mlp.sae.save_model(tmp_path / "mlp")
    return {"calls": calls, "tmp": tmp_path, "lm": tiny_lm}


def one_error_line(capsys) -> str:
    """The one ``error: ...`` line a failed command prints last (progress bars may precede it), nothing on stdout."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.strip().splitlines() if "\r" not in line and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.err.rstrip().endswith(lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# CLI: SAEs that do not exist or do not fit, hubs that cannot be reached, prompts beyond the context


STEER = ["steer", "--feature", "1", "--strength", "1", "--prompt", "the sea"]


@pytest.mark.parametrize(
    "argv, message, loads_model",
    [
        (["steer", "--layer", "3", "--feature", "1", "--strength", "1", "--prompt", "the sea"],
         "no bundled SAE for gemma-3-270m at layer 3; bundled layers: 2", False),
        (["scores", "--layer", "3"], "no bundled SAE for gemma-3-270m at layer 3; bundled layers: 2", False),
        (["eval", "--layer", "3"], "no bundled SAE for gemma-3-270m at layer 3; bundled layers: 2", False),
        (["scores", "--layer", "2", "--features", "7,128"], "feature 128 is out of range for SAE 'tiny-L2': use an integer from 0 to 127", False),
        ([*STEER, "--sae", "{tmp}/narrow"], "reads vectors of size d_in=32, but model 'tiny-gemma3' has width 64", True),
        ([*STEER, "--sae", "{tmp}/mlp"], "hook 'blocks.2.hook_mlp_out' is not a residual-stream hook", True),
        ([*STEER, "--sae", "no-such-release:layer_0"], "unknown sae-lens release 'no-such-release'", False),
        ([*STEER, "--sae", f"{RELEASE}:layer_99/width_1k/canonical"], f"release '{RELEASE}' has no SAE 'layer_99/width_1k/canonical'", False),
        ([*STEER, "--sae", f"{RELEASE}:layer_20/width_16k/canonical"], "the Hugging Face hub is unreachable", True),
        ([*STEER, "--sae", "tiny-L9"], "no bundled SAE for gemma-3-270m with id 'tiny-L9'; bundled layers: 2", False),
    ],
    ids=["steer-no-sae-at-layer", "scores-no-sae-at-layer", "eval-no-sae-at-layer", "feature-beyond-width", "d_in-mismatch",
         "hook-maps-to-no-module", "unknown-release", "unknown-sae-id", "unreachable-hub-sae", "unknown-bundled-id"],
)
def test_cli_sae_errors_are_one_line(cli, capsys, argv, message, loads_model):
    argv = [a.replace("{tmp}", str(cli["tmp"])) for a in argv]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert bool(cli["calls"]) == loads_model  # what can be checked without the model fails before it loads


def test_cli_unreachable_hub_model_is_one_line(capsys, offline):
    assert main(["info", "--model", "nobody/no-such-model"]) == 2
    line = one_error_line(capsys)
    assert "could not load model 'nobody/no-such-model'" in line and f"'{EMBEDDED_MODEL}'" in line


def test_cli_prompt_beyond_the_context_and_too_many_new_tokens(cli, capsys):
    """The tiny model has 512 positions: prompt + continuation must fit (the limit is also never above 2048)."""
    base = ["steer", "--layer", "2", "--feature", "1", "--strength", "1", "--max-new-tokens", "32"]
    assert main([*base, "--prompt", " ".join(["the"] * 600)]) == 2
    assert "the prompt is 601 tokens long; the limit is 480 tokens" in one_error_line(capsys)
    assert main(["steer", "--layer", "2", "--feature", "1", "--strength", "1", "--prompt", "the sea", "--max-new-tokens", "600"]) == 2
    assert "--max-new-tokens 600 does not fit model 'tiny-gemma3', whose context is 512 tokens" in one_error_line(capsys)
    assert main([*base, "--prompt", " ".join(["the"] * 479), "--json"]) == 0  # 480 tokens with BOS: just fits
    assert set(json.loads(capsys.readouterr().out)) == {"baseline", "steered", "strength_meaning"}  # paper mode explains its amp


def test_prompt_limit_is_the_context_minus_the_new_tokens(tiny_lm, monkeypatch):
    """The library checks what the CLI checks: generate, stream and stream_pair refuse a prompt that leaves
    too few of the model's positions for the new tokens, saying the length, the limit and what to do; the
    2048-token cap stays where the context is larger or unknown."""
    over = " ".join(["the"] * 480)  # 481 tokens with BOS
    message = ("the prompt is 481 tokens long; the limit is 480 tokens (model 'tiny-gemma3' has a context of 512 tokens, "
               "32 of them kept for the new tokens): shorten the prompt or ask for fewer new tokens")
    params = SteerParams(max_new_tokens=32)
    for run in (lambda: generate(tiny_lm, over, max_new_tokens=32), lambda: stream(tiny_lm, over, params=params),
                lambda: stream_pair(tiny_lm, over, params=params)):
        with pytest.raises(ConfigError) as err:
            run()
        assert str(err.value) == message
    assert len(encode_prompts(tiny_lm, [over], max_new_tokens=31)[0]) == 481  # one new token fewer: it fits
    with pytest.raises(ConfigError, match="^600 new tokens do not fit model 'tiny-gemma3', whose context is 512 tokens: ask for fewer new tokens$"):
        generate(tiny_lm, "the sea", max_new_tokens=600)
    long = " ".join(["the"] * 2100)
    for context in (None, 1_000_000):
        monkeypatch.setattr(type(tiny_lm), "context_length", property(lambda self, c=context: c))
        with pytest.raises(ConfigError, match=r"^the prompt is 2101 tokens long; the limit is 2048 tokens: shorten the prompt$"):
            encode_prompts(tiny_lm, [long], max_new_tokens=32)


# ---------------------------------------------------------------------------------------------------
# CLI: damaged and read-only caches


def _count_calls(monkeypatch, *names: str) -> list[str]:
    """Record calls of the scoring functions the feature pipeline uses (they still run)."""
    calls: list[str] = []
    for name in names:
        real = getattr(scores_mod, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(f"saesteer.features.{name}", counted)
    return calls


def test_cli_damaged_cache_is_recomputed_to_the_same_result(cli, capsys, monkeypatch):
    tmp = cli["tmp"]
    argv = ["scores", "--layer", "2", "--only", "output", "--batch-size", "32"]
    assert main([*argv, "--out", str(tmp / "first.parquet")]) == 0
    cache = tmp / "cache" / "features"
    chunk = next(cache.rglob("output/*.npz"))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, wrong checksum
    chunk.write_bytes(bytes(raw))
    lens = next(cache.rglob("lens.npz"))
    lens.write_bytes(lens.read_bytes()[:50])  # truncated
    calls = _count_calls(monkeypatch, "logit_lens", "output_scores")
    assert main([*argv, "--out", str(tmp / "again.parquet")]) == 0
    assert calls == ["logit_lens", "output_scores"]  # both damaged files were recomputed, nothing failed
    pd.testing.assert_frame_equal(pd.read_parquet(tmp / "first.parquet"), pd.read_parquet(tmp / "again.parquet"))
    capsys.readouterr()


def test_cli_damaged_feature_data_parquet_is_one_line(cli, capsys):
    tmp = cli["tmp"]
    assert main(["scores", "--layer", "2", "--only", "output", "--no-cache", "--save", str(tmp / "data"), "--out", str(tmp / "s.csv")]) == 0
    capsys.readouterr()
    table = tmp / "data" / "table.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    assert main(["eval", "--layer", "2", "--features", str(tmp / "data")]) == 2
    line = one_error_line(capsys)
    assert "table.parquet is damaged" in line and "recompute it" in line


def _unwritable_caches(tmp_path) -> list:
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache directory should be")
    roots = [blocker / "cache"]  # refused even to root
    if os.geteuid() != 0:  # chmod does not stop root
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        roots.append(ro)
    return roots


def test_cli_read_only_cache_computes_without_caching(cli, capsys, monkeypatch):
    tmp = cli["tmp"]
    argv = ["scores", "--layer", "2", "--only", "output"]
    assert main([*argv, "--no-cache", "--out", str(tmp / "plain.csv")]) == 0
    for i, root in enumerate(_unwritable_caches(tmp)):
        monkeypatch.setenv("SAESTEER_CACHE", str(root))
        with pytest.warns(RuntimeWarning, match="is not writable .*computing without caching"):
            assert main([*argv, "--out", str(tmp / f"ro{i}.csv")]) == 0
        pd.testing.assert_frame_equal(pd.read_csv(tmp / "plain.csv"), pd.read_csv(tmp / f"ro{i}.csv"))
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------
# Out of memory: the batch is halved and retried; results equal the un-faulted run


def _oom_above(limit: int, kind: str = "cuda"):
    """An exception factory: what an allocator raises when a batch of more than ``limit`` rows does not fit."""

    def make(rows: int) -> BaseException:
        if kind == "cuda":
            return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} GiB")
        if kind == "cpu":
            return RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: out of memory ({rows} rows)")
        return MemoryError()

    return make


def _faulty_ranks(monkeypatch, limit: int, kind: str = "cuda") -> list[int]:
    """Make the output score's per-batch step run out of memory above ``limit`` rows; returns the batch sizes seen."""
    real, seen, make = scores_mod._ranks_and_probs, [], _oom_above(limit, kind)

    def faulty(logits, t_ids, cap):
        seen.append(len(logits))
        if len(logits) > limit:
            raise make(len(logits))
        return real(logits, t_ids, cap)

    monkeypatch.setattr(scores_mod, "_ranks_and_probs", faulty)
    return seen


@pytest.mark.parametrize("kind", ["cuda", "cpu", "python"])
def test_output_scores_fall_back_to_smaller_batches(tiny_lm, tiny_sae, monkeypatch, kind):
    params = ScoreParams(batch_size=64)
    clean = output_scores(tiny_lm, tiny_sae, params)
    seen = _faulty_ranks(monkeypatch, 20, kind)
    with pytest.warns(RuntimeWarning, match="out of memory with a batch of") as caught:
        faulted = output_scores(tiny_lm, tiny_sae, params)
    assert str(caught[0].message).startswith("out of memory with a batch of 64 features; retrying with 32")
    assert seen[:3] == [64, 32, 16] and max(seen[3:]) == 16  # halved, and kept small for the rest
    for field in ("features", "score", "min_rank", "max_prob", "token_ids", "ranks", "probs"):
        np.testing.assert_array_equal(getattr(faulted, field), getattr(clean, field), err_msg=field)
    assert not tiny_lm.layers[tiny_sae.layer]._forward_hooks


def test_out_of_memory_at_batch_one_is_a_clear_error_and_other_errors_pass_through(tiny_lm, tiny_sae, monkeypatch):
    _faulty_ranks(monkeypatch, 0)
    with pytest.warns(RuntimeWarning), pytest.raises(OutOfMemory, match=r"out of memory even at batch size 1 \(features; the batch was halved from 8 .*--dtype bfloat16"):
        output_scores(tiny_lm, tiny_sae, ScoreParams(batch_size=8), features=[1, 2, 3])
    assert not tiny_lm.layers[tiny_sae.layer]._forward_hooks

    def broken(start, stop):
        raise RuntimeError("shape mismatch")  # not a memory problem: no retry, no rewording

    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        for_each_batch(10, 4, broken, "items")
    assert is_out_of_memory(torch.OutOfMemoryError("x")) and is_out_of_memory(MemoryError())
    # what torch's CPU allocator raises (a RuntimeError), e.g. for torch.empty(2**46)
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                                         "you tried to allocate 281474976710656 bytes. Error code 12 (Cannot allocate memory)"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_continuation_nll_falls_back_to_smaller_batches(monkeypatch):
    lm = make_tiny_model()
    prefixes = ["the king", "my love", "from my experience ,", "the sea"] * 3
    conts = [" of france and the queen", " is a red apple", " the city is old", ""] * 3
    clean = continuation_nll(lm, prefixes, conts, batch_size=8)
    decoder = lm.model.get_decoder()
    seen = []

    def faulty(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        if seen[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return decoder(*args, **kwargs)

    monkeypatch.setattr(lm.model, "get_decoder", lambda: faulty)
    with pytest.warns(RuntimeWarning, match="out of memory with a batch of") as caught:
        faulted = continuation_nll(lm, prefixes, conts, batch_size=8)
    assert [str(w.message).split(" (")[0] for w in caught] == [
        "out of memory with a batch of 8 texts; retrying with 4", "out of memory with a batch of 4 texts; retrying with 2"]
    assert seen[:3] == [8, 4, 2]
    np.testing.assert_allclose(faulted[0], clean[0], rtol=1e-6, equal_nan=True)  # right padding: float noise only
    np.testing.assert_array_equal(faulted[1], clean[1])


def test_cli_scores_out_of_memory_falls_back_or_says_what_to_do(cli, capsys, monkeypatch):
    tmp = cli["tmp"]
    argv = ["scores", "--layer", "2", "--only", "output", "--no-cache"]
    assert main([*argv, "--out", str(tmp / "clean.parquet")]) == 0
    _faulty_ranks(monkeypatch, 16)
    with pytest.warns(RuntimeWarning, match="retrying with"):
        assert main([*argv, "--out", str(tmp / "faulted.parquet")]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp / "clean.parquet"), pd.read_parquet(tmp / "faulted.parquet"))
    capsys.readouterr()
    _faulty_ranks(monkeypatch, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert main([*argv, "--out", str(tmp / "never.parquet")]) == 2
    line = one_error_line(capsys)
    assert "out of memory even at batch size 1 (features" in line and "--device cpu" in line
    assert not (tmp / "never.parquet").exists()

    def no_room(*args, **kwargs):  # the corpus pass has no batch to halve: it says what to do
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr("saesteer.features.activation_pass", no_room)
    assert main(["scores", "--layer", "2", "--only", "input", "--no-cache", "--tokens", "200"]) == 2
    assert one_error_line(capsys) == "error: out of memory (RuntimeError): free device memory (other jobs or sessions on this device), " \
        "or load the model with --dtype bfloat16 or on --device cpu"


def test_cli_eval_generation_out_of_memory_falls_back_to_the_same_texts(tmp_path, tiny_lm, tiny_sae, capsys, monkeypatch):
    """The evaluation decodes its rows in batches: out of memory, they are halved and the texts stay the same."""
    from test_evaluate import DOCS, PREFIXES

    import saesteer.steering as steering_mod
    from saesteer.evaluation import load_results
    from saesteer.features import compute_many

    model_dir, sae_dir, feat_dir = tmp_path / "model", tmp_path / "sae", tmp_path / "features"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    tiny_sae.sae.save_model(str(sae_dir))
    seqs = [tiny_lm.tokenizer(d.text).input_ids for d in DOCS] * 4
    data = compute_many(tiny_lm, [tiny_sae], corpus_sequences=seqs, n_tokens=None, cache=False, use_bundled=False, top_n=12)[0]
    data.meta["sae_id"] = "sae"
    data.save(feat_dir)
    (tmp_path / "concepts.txt").write_text("apple\n")
    (tmp_path / "prefixes.txt").write_text("\n".join(PREFIXES) + "\n")

    def argv(out: str) -> list[str]:
        return ["eval", "--model", str(model_dir), "--device", "cpu", "--sae", str(sae_dir), "--features", str(feat_dir),
                "--concepts", str(tmp_path / "concepts.txt"), "--prefixes", str(tmp_path / "prefixes.txt"), "--n-prefixes", "4",
                "--strengths", "1,8", "--methods", "sae_output", "unsteered", "--max-new-tokens", "4", "--out", str(tmp_path / out)]

    assert main(argv("clean")) == 0
    real, sizes = steering_mod.generate, []

    def faulty(lm, prompts, **kwargs):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(lm, prompts, **kwargs)

    monkeypatch.setattr(steering_mod, "generate", faulty)
    with pytest.warns(RuntimeWarning, match="out of memory with a batch of .* prompts"):
        assert main(argv("faulted")) == 0
    first_ok = next(i for i, n in enumerate(sizes) if n <= 2)
    assert sizes[0] > 2 and all(n <= 2 for n in sizes[first_ok:])  # halved once, then kept small
    key = ["concept", "method", "split", "strength", "prefix_idx"]
    a = load_results(tmp_path / "clean").generations.sort_values(key).reset_index(drop=True)
    b = load_results(tmp_path / "faulted").generations.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["text"]], b[key + ["text"]])
    capsys.readouterr()

    def never_fits(lm, prompts, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(steering_mod, "generate", never_fits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert main(argv("never")) == 2
    assert "out of memory even at batch size 1 (prompts" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# App, tiny fixture: link parameters and widgets


def _problems(at) -> str:
    return " ".join(w.value for w in at.sidebar.warning)


@pytest.mark.parametrize(
    "query, message",
    [
        ({"layer": "9"}, "link parameter 'layer' ignored: no SAE at layer 9; layers with an SAE: 1, 2, 3"),
        ({"sae": "tiny-topk-L9"}, "link parameter 'sae' ignored: 'tiny-topk-L9' is not among the SAEs offered here"),
        ({"feature": "-1"}, "link parameter 'feature' ignored: feature must be a non-negative integer, got '-1'"),
        ({"feature": "abc"}, "feature must be a non-negative integer, got 'abc'"),
        ({"feature": "2.5"}, "feature must be a non-negative integer, got '2.5'"),
        ({"strength": "nan"}, "link parameter 'strength' ignored: strength 'nan' is out of range"),
        ({"strength": "inf"}, "strength 'inf' is out of range: use a finite number with |strength| <= 1000"),
        ({"strength": "1e9"}, "strength '1e9' is out of range"),
        ({"mode": "sideways"}, "mode 'sideways' is unknown"),
        ({"prompt": "x" * 3000}, "prompt is 3000 characters long; at most 2000 are accepted"),
        ({"sae": "/etc"}, "SAE path '/etc' is outside the allowed folders"),
    ],
    ids=["layer-without-sae", "unknown-sae", "negative-feature", "text-feature", "fractional-feature", "nan-strength",
         "inf-strength", "huge-strength", "unknown-mode", "over-long-prompt", "path-outside-roots"],
)
def test_app_bad_link_parameters_are_refused_with_a_message(fixture_env, query, message):
    at = app(**query).run()
    no_exception(at)
    assert message in _problems(at)
    at.switch_page(NAV["lab"].path).run()
    no_exception(at)
    assert not at.error
    assert at.sidebar.selectbox(key="sb_sae_ref").value == "tiny-topk-L1"  # the defaults stand
    slider = at.slider(key="lab_s0")
    assert slider.min <= slider.value <= slider.max


def test_app_feature_beyond_the_sae_is_an_error_on_the_card(fixture_env):
    at = app(feature="100000").run()
    at.switch_page(NAV["card"].path).run()
    no_exception(at)
    assert any("feature 100000 does not exist in SAE tiny-topk-L1: use an id from 0 to 127" in e.value for e in at.error)


def test_app_widgets_keep_values_within_bounds(fixture_env):
    """Streamlit refuses widget values outside their bounds (feature id, strength, max new tokens); a
    generation with whatever remains runs without error."""
    at = app(layer="2").run()
    at.switch_page(NAV["lab"].path).run()
    for key, bad in (("lab_max_new", 0), ("lab_max_new", 5000), ("lab_s0", 1e9), ("lab_s0", -1e9)):
        (at.slider(key=key)).set_value(bad).run()
        no_exception(at)
        slider = at.slider(key=key)
        assert slider.min <= slider.value <= slider.max and slider.max <= 1000
    assert at.slider(key="lab_max_new").min >= 1 and at.slider(key="lab_max_new").max <= 1024
    for bad in (128, -1):
        at.number_input(key="lab_f0").set_value(bad).run()
        no_exception(at)
        assert 0 <= at.number_input(key="lab_f0").value <= 127
    at.button(key="lab_go").click().run()
    no_exception(at)
    assert not at.error and at.session_state["lab_last"]["steered"]


@pytest.mark.parametrize(
    "prompt, message",
    [("   ", "the prompt is empty: give some text to continue"),
     (" ".join(["the"] * 499), ("the prompt is 500 tokens long; the limit is 480 tokens (model 'tiny-gemma3' has a context of 512 tokens, "
                                "32 of them kept for the new tokens): shorten the prompt or ask for fewer new tokens"))],
    ids=["empty", "beyond-the-context"],
)
def test_app_empty_and_over_long_prompts_are_errors(fixture_env, prompt, message):
    at = app().run()
    at.switch_page(NAV["lab"].path).run()
    at.text_area(key="lab_prompt").input(prompt).run()
    at.button(key="lab_go").click().run()
    no_exception(at)
    assert [e.value for e in at.error] == [message]
    at.text_area(key="lab_prompt").input("the sea").run()
    at.button(key="lab_go").click().run()  # the app is still up
    no_exception(at)
    assert not at.error and at.session_state["lab_last"]["prompt"] == "the sea"


@pytest.mark.parametrize(
    "key, value",
    [("strength", float("nan")), ("lab_rows", float("inf")), ("lab_rows", float("-inf"))],
    ids=["nan-shared-strength", "inf-lab-row", "minus-inf-lab-row"],
)
def test_app_non_finite_strength_in_the_session_is_refused_with_a_message(fixture_env, key, value):
    """A strength that is not a number is refused where the lab reads it (the shared selection, or the rows the
    feature card hands over), not clamped silently to the slider's end; the default strength stands instead."""
    at = app().run()
    at.session_state[key] = [{"feature": 3, "strength": value}] if key == "lab_rows" else value
    at.switch_page(NAV["lab"].path).run()
    no_exception(at)
    feature = 3 if key == "lab_rows" else at.number_input(key="lab_f0").value
    from saesteer.ui.pages.lab import DEFAULT_STRENGTH

    default = DEFAULT_STRENGTH["paper"]
    assert [e.value for e in at.error] == [f"strength {value!r} of feature {feature} is not a finite number: refused, set to {default:g}"]
    assert at.slider(key="lab_s0").value == default
    at.button(key="lab_go").click().run()
    no_exception(at)
    assert not at.error and at.session_state["lab_last"]["steered"]


def test_app_feature_beyond_the_sae_is_an_error_in_the_lab(fixture_env):
    """A feature id from the link that the SAE does not have is reported in the lab too, not silently replaced."""
    at = app(feature="100000").run()
    at.switch_page(NAV["lab"].path).run()
    no_exception(at)
    shown = at.number_input(key="lab_f0").value
    assert [e.value for e in at.error] == [f"feature 100000 does not exist in SAE tiny-topk-L1: use an id from 0 to 127; showing feature {shown} instead"]
    assert 0 <= shown <= 127


def test_app_out_of_memory_in_the_lab_is_an_error_not_a_crash(fixture_env, monkeypatch):
    """Out of memory while streaming the pair (after the first token) or during the sweep is an error that says
    what to reduce; the page stays up and the next generation runs."""
    from saesteer.ui.pages import lab

    def oom_pair(*args, **kwargs):
        yield ("the", "the")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def oom_generate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GiB")

    real_pair, real_generate = lab.stream_pair, lab.generate
    monkeypatch.setattr(lab, "stream_pair", oom_pair)
    monkeypatch.setattr(lab, "generate", oom_generate)
    at = app().run()
    at.switch_page(NAV["lab"].path).run()
    at.button(key="lab_go").click().run()
    no_exception(at)
    [error] = [e.value for e in at.error]
    assert error.startswith("Out of memory while generating the baseline and steered texts (OutOfMemoryError: CUDA out of memory.")
    assert "fewer new tokens" in error and "untick fast decode" in error and "on the cpu" in error
    assert "lab_last" not in at.session_state
    at.multiselect(key="lab_grid_paper").set_value([0.0, 2.0]).run()
    at.button(key="lab_sweep").click().run()
    no_exception(at)
    # Live mode re-streams the pair on this rerun too, so its error may show again beside the sweep's.
    [error] = [e for e in (e.value for e in at.error) if "sweep" in e]
    assert error.startswith("Out of memory while running the sweep (2 continuations in one batch) (RuntimeError: [enforce fail")
    assert "fewer strengths" in error and "skip the sweep" in error and "on the cpu" in error
    assert "lab_sweep_result" not in at.session_state
    monkeypatch.setattr(lab, "stream_pair", real_pair)
    monkeypatch.setattr(lab, "generate", real_generate)
    at.button(key="lab_go").click().run()
    at.button(key="lab_sweep").click().run()
    no_exception(at)
    assert not at.error and at.session_state["lab_last"]["steered"] and len(at.session_state["lab_sweep_result"]) == 2


# ---------------------------------------------------------------------------------------------------
# App, real loaders with the tiny model: SAEs that do not fit, hubs out of reach, damaged/read-only caches


@pytest.fixture
def real_tiny(real_mode, monkeypatch, tiny_lm, tmp_path):
    """The app's real loaders with the tiny model, the cache in tmp_path and a small corpus for feature jobs."""
    from saesteer.ui import loaders

    monkeypatch.setattr(loaders, "load_model", lambda spec: tiny_lm)
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    docs = [Doc(" ".join(rng.choice(WORDS) for _ in range(40)), "test") for _ in range(30)]
    monkeypatch.setattr("saesteer.corpus.iter_bundled", lambda split=None, **kw: iter(docs))
    return tmp_path


def _sae_dir(tmp_path, name: str, seed: int, hook: str | None = None):
    sae = make_tiny_sae(layer=2, seed=seed)
    if hook:
        sae.sae.cfg.metadata.hook_name = hook
    sae.sae.save_model(str(tmp_path / name))
    return tmp_path / name


def _local_sae(at, path):
    at.sidebar.radio(key="sb_sae_source").set_value("local").run()
    at.sidebar.text_input(key="sb_sae_path").input(str(path)).run()
    no_exception(at)
    return at


def test_app_sae_hook_that_maps_to_no_module_is_an_error(real_tiny):
    at = _local_sae(app().run(), _sae_dir(real_tiny, "mlp", 3, hook="blocks.2.hook_mlp_out"))
    assert any("not a residual-stream hook" in e.value for e in at.sidebar.error)
    at.switch_page(NAV["lab"].path).run()
    no_exception(at)
    assert any("not a residual-stream hook" in e.value for e in at.error)


def test_app_unknown_sae_id_in_a_link_and_an_unreachable_hub(real_tiny):
    at = app(sae=f"{RELEASE}:layer_99/width_1k/canonical").run()
    no_exception(at)
    assert f"link parameter 'sae' ignored: '{RELEASE}:layer_99/width_1k/canonical' is not among the SAEs offered here" in _problems(at)
    # The release's first SAE is selected instead; offline it cannot be downloaded: said so, no crash.
    assert any("could not download SAE" in e.value and "hub is unreachable" in e.value for e in at.sidebar.error)
    at.switch_page(NAV["features"].path).run()
    no_exception(at)
    assert at.error


def _wait(job, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while job.running and time.time() < deadline:
        time.sleep(0.2)
    assert not job.running


def _start_job(at):
    at.switch_page(NAV["features"].path).run()
    at.button(key="cp_start").click().run()
    no_exception(at)
    from saesteer.ui import loaders

    return at, loaders


def test_app_damaged_feature_data_is_an_error_and_can_be_recomputed(real_tiny):
    at = _local_sae(app().run(), _sae_dir(real_tiny, "sae", 21))
    at, loaders = _start_job(at)
    job = next(j for j in loaders.jobs().all() if str(j.target).startswith(str(real_tiny)))
    _wait(job)
    assert job.done, job.error
    table = job.target / "table.parquet"
    table.write_bytes(table.read_bytes()[:100])
    at.run()
    no_exception(at)
    assert any("Could not load the feature data" in e.value and "is damaged" in e.value for e in at.sidebar.error)
    assert at.button(key="cp_start")  # the page offers to compute again
    at.button(key="cp_start").click().run()
    _wait(loaders.jobs().get(job.key))
    at.run()
    no_exception(at)
    assert not at.sidebar.error and len(at.dataframe[1].value) == 50


def test_app_read_only_cache_keeps_computed_scores_in_memory(real_tiny, monkeypatch):
    blocker = real_tiny / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SAESTEER_CACHE", str(blocker / "cache"))
    at = _local_sae(app().run(), _sae_dir(real_tiny, "sae-ro", 22))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the store's own "not writable" warning, in the job thread
        at, loaders = _start_job(at)
        job = next(j for j in loaders.jobs().all() if str(j.target).startswith(str(blocker)))
        _wait(job)
    assert job.done, job.error
    at.run()
    no_exception(at)
    assert any("kept in memory only" in w.value and "not writable" in w.value for w in at.sidebar.warning)
    assert len(at.dataframe[1].value) == 50  # the ranked tables are shown from memory


def test_app_out_of_memory_in_a_feature_job_is_an_error_not_a_crash(real_tiny, monkeypatch):
    _faulty_ranks(monkeypatch, 0)
    at = _local_sae(app().run(), _sae_dir(real_tiny, "sae-oom", 23))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        at, loaders = _start_job(at)
        job = next(j for j in loaders.jobs().all() if str(j.target).startswith(str(real_tiny)) and "sae-oom" in str(j.target))
        _wait(job)
    assert job.error and "OutOfMemory" in job.error
    at.run()
    no_exception(at)
    assert any("The last computation failed" in e.value and "out of memory even at batch size 1 (features" in e.value for e in at.error)
    assert at.button(key="cp_start")


def test_cli_presets_writes_the_search_resumes_it_and_keeps_a_finished_one(cli, capsys, monkeypatch):
    from saesteer import presets
    from saesteer.paths import presets_file

    tmp = cli["tmp"]
    # the random tiny SAE has no concept whose output pick says it: give the search three, and no model time
    monkeypatch.setattr(presets, "search_candidates", lambda bank, tok, concepts=None, pool=300: [(w, i, w, 0.5) for i, w in enumerate(("alpha", "beta", "gamma"))])
    monkeypatch.setattr(presets, "calibrate", lambda lm, sae, fs, ws, **kw: [
        presets.Calibration(int(f), w, presets.FALLBACK_STRENGTH, False, {1.0: ""}, {1.0: 0.0}, {1.0: 0}, 3) for f, w in zip(fs, ws)])
    assert main(["scores", "--layer", "2", "--only", "output", "--no-cache", "--save", str(tmp / "data"), "--out", str(tmp / "s.csv")]) == 0
    argv = ["presets", "--layer", "2", "--features", str(tmp / "data"), "--out", str(tmp / "p")]
    assert main([*argv, "--tries", "1"]) == 0
    path = presets_file(tmp / "p", cli["lm"].name, "tiny-L2")
    first = presets.read_search(path)
    assert first is not None and first.done and first.n_candidates == 3 and len(first.tried) == 1
    assert f"tiny-L2: {first.summary()}" in capsys.readouterr().err
    assert main([*argv, "--tries", "1"]) == 0  # finished for this budget: kept as it is
    assert "up to date" in capsys.readouterr().err and presets.read_search(path) == first
    assert main([*argv, "--tries", "2"]) == 0  # a larger budget goes on from the candidates already tried
    again = presets.read_search(path)
    assert again.tried[:1] == first.tried and len(again.tried) == 2
    capsys.readouterr()
    assert main(["presets", "--layer", "2", "--out", str(tmp / "p")]) == 2  # no bundled feature data for this SAE
    assert "no precomputed feature data" in one_error_line(capsys)
