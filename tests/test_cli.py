"""The info, steer and (many-SAE) scores subcommands, driven in-process with the tiny model standing in for the real one."""

from __future__ import annotations

import json

import pytest

from saesteer import models, paths, saes
from saesteer.__main__ import main
from saesteer.config import EMBEDDED_MODEL, SaeSpec
from saesteer.hookpoints import tl_hook_name
from saesteer.steering import generate
from saesteer.testing import make_tiny_sae


@pytest.fixture
def env(tiny_lm, tmp_path, monkeypatch):
    """Bundled SAEs for the embedded model name in a temp assets dir (one tiny TopK at layer 2); the model
    loader returns the tiny model and counts its calls."""
    root = tmp_path / "saes"
    model_dir = root / EMBEDDED_MODEL
    make_tiny_sae(layer=2).sae.save_model(model_dir / "L2")
    entry = {"id": "tiny-L2", "layer": 2, "width": 128, "hook": tl_hook_name(2), "dir": "L2", "metrics": {}}
    (model_dir / "manifest.json").write_text(json.dumps({"saes": [entry]}))
    monkeypatch.setattr(paths, "BUNDLED_SAES", root)
    calls = []
    monkeypatch.setattr(models, "load_model", lambda spec=None: calls.append(spec) or tiny_lm)
    return {"root": root, "calls": calls, "lm": tiny_lm}


def test_info_json(env, capsys):
    assert main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == {"name": "tiny-gemma3", "n_layers": 4, "d_model": 64, "vocab_size": len(env["lm"].tokenizer), "device": "cpu"}
    assert out["saes"] == [
        {"id": "tiny-L2", "layer": 2, "width": 128, "hook": "blocks.2.hook_resid_post", "path": str(env["root"] / EMBEDDED_MODEL / "L2"),
         "diagnostics": None}
    ]


def test_info_diagnoses_a_chosen_sae_on_heldout_text(env, capsys):
    from saesteer.diagnostics import diagnose, heldout_residuals, heldout_sequences

    assert main(["info", "--json", "--layer", "2", "--diagnose-tokens", "512"]) == 0
    got = json.loads(capsys.readouterr().out)["diagnosed"]
    lm = env["lm"]
    sae = saes.load_sae(SaeSpec(layer=2), lm)
    want = diagnose(sae, heldout_residuals(lm, [2], heldout_sequences(lm, 512))[2]).to_dict()
    assert got["id"] == "tiny-L2"
    g = got["diagnostics"]
    assert [x["latent"] for x in g["dense_latents"]] == [x["latent"] for x in want["dense_latents"]]
    for key in ("n_tokens", "n_dense", "peak_is_dense", "median_peak_share", "median_peak_density"):
        assert g[key] == pytest.approx(want[key], rel=1e-5), key
    assert main(["info", "--layer", "2", "--diagnose-tokens", "512"]) == 0
    assert "tiny-L2: At " in capsys.readouterr().out
    assert main(["info", "--layer", "2", "--diagnose-tokens", "5"]) == 2
    assert "at least 128" in capsys.readouterr().err


def test_info_table(env, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "4 layers, d_model 64" in out
    assert "tiny-L2" in out and "blocks.2.hook_resid_post" in out


@pytest.mark.parametrize("model", ["google/gemma-2-2b", "../../etc"])
def test_info_other_model_lists_no_bundled_saes(env, capsys, model):
    assert main(["info", "--json", "--model", model]) == 0
    assert json.loads(capsys.readouterr().out)["saes"] == []


def test_info_without_bundled_saes(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "BUNDLED_SAES", tmp_path / "empty")
    assert main(["info"]) == 0
    assert "none bundled" in capsys.readouterr().out


def test_steer_json_matches_the_library(env, capsys):
    argv = ["steer", "--layer", "2", "--feature", "5", "--strength", "8", "--prompt", "the king of france", "--max-new-tokens", "10", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    lm = env["lm"]
    sae = saes.load_sae(SaeSpec(layer=2), lm)
    assert out["baseline"] == generate(lm, "the king of france", max_new_tokens=10)[0]
    assert out["steered"] == generate(lm, "the king of france", sae=sae, features=[5], strengths=[8.0], max_new_tokens=10)[0]
    assert out["baseline"] != out["steered"]
    from saesteer.diagnostics import explain_amps, prompt_strength

    # Paper mode says what amp 8 adds at the prompt's last position (no feature data: density unknown).
    want = explain_amps(prompt_strength(lm, sae, "the king of france"), sae, [5], [8.0])
    assert out["strength_meaning"] == want and want[0].startswith("amp 8 adds ") and "density is not measured" in want[0]


def test_steer_several_features_additive_text_output(env, capsys):
    argv = ["steer", "--sae", "tiny-L2", "--feature", "5", "--strength", "2", "--feature", "17", "--strength", "-3",
            "--mode", "additive", "--prompt", "my love", "--max-new-tokens", "6", "--temperature", "0.7", "--seed", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lm = env["lm"]
    sae = saes.load_sae(SaeSpec(layer=2), lm)
    steered = generate(lm, "my love", sae=sae, features=[5, 17], strengths=[2.0, -3.0], mode="additive", max_new_tokens=6, temperature=0.7, seed=4)[0]
    assert "5×2, 17×-3" in out and "additive mode" in out
    assert f"steered:  {steered}\n" in out
    assert "strength:" not in out  # additive coefficients have no paper-mode unit to explain


BASE = ["steer", "--layer", "2", "--prompt", "the sea"]


@pytest.mark.parametrize(
    "extra,message,loads_model",
    [
        (["--layer", "3", "--feature", "1", "--strength", "1"], "no bundled SAE for gemma-3-270m at layer 3; bundled layers: 2", False),
        (["--feature", "128", "--strength", "1"], "feature 128 is out of range for SAE 'tiny-L2': use an integer from 0 to 127", False),
        (["--feature=-1", "--strength", "1"], "feature id must be a non-negative integer, got -1", False),
        (["--feature", "abc", "--strength", "1"], "--feature must be an integer, got 'abc'", False),
        (["--feature", "2.5", "--strength", "1"], "--feature must be an integer, got '2.5'", False),
        (["--feature", "1", "--strength", "nan"], "--strength must be a finite number, got 'nan'", False),
        (["--feature", "1", "--strength", "inf"], "--strength must be a finite number, got 'inf'", False),
        (["--feature", "1", "--strength", "1e9"], "strength 1000000000.0 is out of range: use |strength| <= 1000", False),
        (["--feature", "1", "--strength", "x"], "--strength must be a number, got 'x'", False),
        (["--feature", "1", "--feature", "2", "--strength", "1"], "2 features but 1 strengths: give one strength per feature", False),
        (["--feature", "1", "--strength", "1", "--max-new-tokens", "0"], "max_new_tokens must be an integer from 1 to 1024, got 0", False),
        (["--feature", "1", "--strength", "1", "--max-new-tokens", "5000"], "max_new_tokens must be an integer from 1 to 1024, got 5000", False),
        (["--feature", "1", "--strength", "1", "--mode", "sideways"], "mode 'sideways' is unknown: use 'paper' or 'additive'", False),
        (["--feature", "1", "--strength", "1", "--temperature", "-1"], "temperature must be between 0 and 5", False),
        ([], "give at least one --feature F", False),
    ],
)
def test_steer_bad_input_is_one_clear_line(env, capsys, extra, message, loads_model):
    assert main(BASE + extra) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert bool(env["calls"]) == loads_model  # input errors are caught before the model loads


def test_steer_empty_prompt(env, capsys):
    assert main(["steer", "--layer", "2", "--feature", "1", "--strength", "1", "--prompt", "   "]) == 2
    assert capsys.readouterr().err.strip() == "error: the prompt is empty: give some text with --prompt"
    assert not env["calls"]


def test_steer_needs_an_sae(env, capsys):
    assert main(["steer", "--feature", "1", "--strength", "1", "--prompt", "the sea"]) == 2
    assert "give --layer L" in capsys.readouterr().err


def _unwritable(tmp_path, flag: str):
    """A path ``flag`` cannot write: a file where --save's directory should go, a directory where --out's table should."""
    blocked = tmp_path / "taken.csv"
    if flag == "--save":
        blocked.write_text("a file where the directory should go")
    else:
        blocked.mkdir()
    return blocked


def _assert_one_write_error(capsys, flag: str, path) -> None:
    """The write failure is one error line naming the flag and the path, saying the scores are cached, no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {flag}: could not write {path} (") and "Traceback" not in "\n".join(err)
    assert "the scores are computed and in the feature cache" in err[-1]


@pytest.mark.parametrize("flag", ["--save", "--out"])
def test_scores_one_sae_unwritable_output_is_one_clear_line(env, capsys, tmp_path, monkeypatch, flag):
    """The single-SAE path, as the many-SAE one: a --save or --out that cannot be written is one error line naming
    the path (no traceback), and a rerun to a writable path succeeds."""
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    blocked = _unwritable(tmp_path, flag)
    base = ["scores", "--layer", "2", "--only", "output"]
    assert main([*base, flag, str(blocked)]) == 2
    _assert_one_write_error(capsys, flag, blocked)
    ok = tmp_path / ("saved" if flag == "--save" else "table.csv")
    assert main([*base, flag, str(ok)]) == 0
    assert (ok / "table.parquet").exists() if flag == "--save" else ok.read_text().startswith("feature,")


@pytest.mark.parametrize("flag", ["--save", "--out"])
def test_scores_many_unwritable_output_is_one_clear_line(env, capsys, tmp_path, monkeypatch, flag):
    """A --save or --out that cannot be written after the job ran: one error line naming the path, saying the
    scores are cached; a rerun to a writable path reads them from the cache."""
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    blocked = _unwritable(tmp_path, flag)
    target = blocked / "tiny-L2" if flag == "--save" else blocked
    base = ["scores", "--layers", "2", "--only", "output"]
    assert main([*base, flag, str(blocked)]) == 2
    _assert_one_write_error(capsys, flag, target)
    ok = tmp_path / ("saved" if flag == "--save" else "table.csv")
    assert main([*base, flag, str(ok)]) == 0
    assert (ok / "tiny-L2" / "table.parquet").exists() if flag == "--save" else ok.read_text().startswith("sae,layer,")
