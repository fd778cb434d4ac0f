"""Gemma Scope 2 for the embedded model: the catalogue from sae-lens' installed directory, loading through
sae-lens' real ``gemma_3`` conversion from a local hub cache with the hub offline, feature subsets, the cost
check, and Neuronpedia links and exports. Nothing here touches the network (``no_network`` refuses it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from saesteer import gemmascope, neuronpedia, subsets
from saesteer.activations import activation_pass
from saesteer.config import EMBEDDED_MODEL, SaeSpec
from saesteer.features import compute_many
from saesteer.saes import SaeLoadError, load_sae
from saesteer.testing import SCOPE_ID, SCOPE_RELEASE, make_tiny_model, make_tiny_sae, write_scope_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def deep_lm():
    """A tiny Gemma 3 with 16 layers, so that a layer-12 SAE fits it (d_model 64)."""
    return make_tiny_model(n_layers=16)


def _corpus(lm, n: int = 60, length: int = 30, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[lm.tokenizer.bos_token_id, *rng.integers(4, len(lm.tokenizer), length - 1).tolist()] for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# The catalogue


def test_catalogue_comes_from_the_installed_sae_lens_directory(no_network):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    assert gemmascope.releases(EMBEDDED_MODEL) == ["gemma-scope-2-270m-pt-res", "gemma-scope-2-270m-pt-res-all"]
    entries = gemmascope.catalogue(SCOPE_RELEASE)
    ids = [s.sae_id for s in entries]
    assert "layer_12_width_16k_l0_medium" in ids
    assert set(ids) == {i for i in directory[SCOPE_RELEASE].saes_map if i.startswith("layer_")}
    assert gemmascope.layers(entries) == [5, 9, 12, 15]
    assert gemmascope.widths(entries, 12) == ["16k", "65k", "262k", "1m"]
    medium = gemmascope.find(SCOPE_RELEASE, SCOPE_ID)
    assert medium.l0 == directory[SCOPE_RELEASE].expected_l0[SCOPE_ID]
    assert medium.neuronpedia_id == directory[SCOPE_RELEASE].neuronpedia_id[SCOPE_ID] == "gemma-3-270m/12-gemmascope-2-res-16k"
    assert medium.width == 16_384 and medium.layer == 12 and medium.ref == f"{SCOPE_RELEASE}:{SCOPE_ID}"
    options = [s.l0_option for s in gemmascope.sparsities(entries, 12, "16k")]
    assert options == [f"{name} · L0 {directory[SCOPE_RELEASE].expected_l0[f'layer_12_width_16k_l0_{name}']:g}" for name in ("small", "medium", "big")]
    every = gemmascope.catalogue("gemma-scope-2-270m-pt-res-all")
    assert gemmascope.layers(every) == list(range(18)) and gemmascope.widths(every, 3) == ["16k", "262k"]
    assert gemmascope.releases("google/gemma-2-2b") == []
    assert no_network == []


def test_unknown_release_and_id_are_named():
    with pytest.raises(SaeLoadError, match="no SAE 'layer_12_width_3k_l0_medium'.*layer_12_width_16k_l0_medium"):
        gemmascope.find(SCOPE_RELEASE, "layer_12_width_3k_l0_medium")
    with pytest.raises(SaeLoadError, match="not a Gemma Scope 2 release.*gemma-scope-2-270m-pt-res"):
        gemmascope.catalogue("gemma-scope-2b-pt-res-canonical")
    with pytest.raises(SaeLoadError, match="has no SAE 'layer_99'"):
        load_sae(SaeSpec(source="release", release=SCOPE_RELEASE, sae_id="layer_99"))


# ---------------------------------------------------------------------------------------------------
# Loading through sae-lens' gemma_3 conversion from a local hub cache, offline


def test_real_gemma_3_loader_reads_a_local_hub_cache_offline(scope_hub, no_network, deep_lm):
    from sae_lens.loading import pretrained_sae_loaders

    weights = write_scope_cache(scope_hub)
    original = pretrained_sae_loaders.get_safetensors_tensor_shapes
    loaded = load_sae(SaeSpec(source="release", release=SCOPE_RELEASE, sae_id=SCOPE_ID), deep_lm)
    assert no_network == []
    assert pretrained_sae_loaders.get_safetensors_tensor_shapes is original  # the workaround left nothing behind
    s = loaded.sae
    assert type(s).__name__ == "JumpReLUSAE" and s.cfg.architecture() == "jumprelu"
    assert loaded.layer == 12 and loaded.hook_name == "blocks.12.hook_resid_post" and loaded.width == 128
    assert loaded.id == f"{SCOPE_RELEASE}/{SCOPE_ID}"
    assert s.cfg.metadata.model_name == "google/gemma-3-270m"
    assert neuronpedia.neuronpedia_id(loaded) == "gemma-3-270m/12-gemmascope-2-res-16k"
    for ours, theirs in (("W_enc", "w_enc"), ("W_dec", "w_dec"), ("b_enc", "b_enc"), ("b_dec", "b_dec"), ("threshold", "threshold")):
        assert torch.equal(getattr(s, ours).detach(), weights[theirs]), ours
    x = torch.randn(7, 64)
    pre = x @ weights["w_enc"] + weights["b_enc"]
    expected = pre * (pre > weights["threshold"])  # JumpReLU as Gemma Scope defines it
    torch.testing.assert_close(s.encode(x), expected)
    torch.testing.assert_close(s.decode(expected), expected @ weights["w_dec"] + weights["b_dec"])


def test_plain_sae_lens_needs_the_network_for_the_safetensors_header(scope_hub, no_network):
    """The one call of sae-lens' gemma_3 path the hub cache cannot serve: the HTTP range request for the
    params.safetensors header, made through `requests` even though the file is cached and offline mode is on."""
    from sae_lens import SAE

    write_scope_cache(scope_hub)
    with pytest.raises(OSError) as info:
        SAE.from_pretrained(SCOPE_RELEASE, SCOPE_ID)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "get_safetensors_tensor_shapes" in frames and "_get_with_rate_limit_retry" in frames
    assert no_network  # it did try to connect


def test_offline_and_not_cached_is_one_clear_message_without_a_connection(scope_hub, no_network, deep_lm):
    with pytest.raises(gemmascope.HubUnavailable) as info:
        load_sae(SaeSpec(source="release", release=SCOPE_RELEASE, sae_id=SCOPE_ID), deep_lm)
    message = str(info.value)
    assert SCOPE_RELEASE in message and SCOPE_ID in message
    assert "needs the hub once" in message and "then cached" in message and "bundled SAEs" in message
    assert "HF_HUB_OFFLINE" in message and "about 9 MB" in message  # the yaml's 16k features × d_model 64, float32
    assert no_network == []


def test_unreachable_hub_without_offline_mode_is_the_same_message(scope_hub, no_network, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(gemmascope.HubUnavailable, match=f"{SCOPE_RELEASE} / {SCOPE_ID}.*needs the hub once"):
        gemmascope.load(SCOPE_RELEASE, SCOPE_ID, d_model=640)
    assert no_network  # it tried, and was refused


def test_environment_variables_alone_select_the_cache_and_offline_mode(tmp_path):
    """HF_HUB_CACHE and HF_HUB_OFFLINE=1 as a user sets them, read by huggingface_hub at import (a fresh
    process, sockets refused), loading the SAE through saesteer's SAE loader."""
    cache = tmp_path / "hub"
    write_scope_cache(cache)
    script = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network refused')\n"
        "socket.socket.connect = refuse\n"
        "from saesteer.config import SaeSpec\n"
        "from saesteer.saes import load_sae\n"
        f"s = load_sae(SaeSpec(source='release', release={SCOPE_RELEASE!r}, sae_id={SCOPE_ID!r}))\n"
        "print(s.layer, s.width, s.hook_name)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["12", "128", "blocks.12.hook_resid_post"]


# ---------------------------------------------------------------------------------------------------
# Feature subsets


def test_subset_scores_equal_the_full_sae_rows(tiny_lm):
    sae = make_tiny_sae(arch="jumprelu", layer=2, seed=3)
    corpus = _corpus(tiny_lm)
    full = compute_many(tiny_lm, [sae], corpus, n_tokens=None, cache=False)[0]
    features = [127, 3, 64, 17, 100, 3]
    part = subsets.compute_subset(tiny_lm, sae, features, corpus, n_tokens=None, cache=False)
    want = sorted(set(features))
    assert part.table["feature"].tolist() == want and part.lens.features.tolist() == want
    ref = full.subset(want)
    for col in ("output_score", "input_score", "density", "max_activation", "min_rank", "max_prob"):
        np.testing.assert_allclose(part.table[col].to_numpy(float), ref.table[col].to_numpy(float), rtol=1e-5, atol=1e-7, err_msg=col)
    assert part.table["n_contexts"].tolist() == ref.table["n_contexts"].tolist()
    assert np.array_equal(part.lens.top_ids, ref.lens.top_ids) and np.array_equal(part.ctx_seq, ref.ctx_seq)
    assert np.array_equal(part.ctx_tokens, ref.ctx_tokens) and np.array_equal(part.hist_counts, ref.hist_counts)
    assert part.meta["subset"]["features"] == want and part.meta["sae_id"] == sae.id and part.meta["width"] == 128
    assert subsets.subset_label(part.meta) == "5 of 128 features" and subsets.subset_label(full.meta) is None
    assert part.contexts(want[0])[0].tokens == ref.contexts(want[0])[0].tokens


def test_restricted_sae_keeps_the_full_strength_unit(tiny_lm):
    sae = make_tiny_sae(arch="jumprelu", layer=1, seed=1)
    sub = subsets.restrict(sae, [5, 9])
    x = torch.randn(3, 64)
    torch.testing.assert_close(sub.sae.encode(x), sae.sae.encode(x)[:, [5, 9]])
    torch.testing.assert_close(sub.directions([0, 1]), sae.directions([5, 9]))
    assert sub.latent_max(x) == sae.sae.encode(x).max() and sub.latent_max(x) > sub.sae.encode(x).max()


def test_subsets_are_refused_where_latents_compete_and_ids_are_checked(tiny_sae):
    with pytest.raises(SaeLoadError, match="latents compete"):
        subsets.restrict(tiny_sae, [1, 2])
    jr = make_tiny_sae(arch="jumprelu")
    with pytest.raises(subsets.ScoringPlanError, match="feature 128 is out of range.*0 to 127"):
        subsets.restrict(jr, [1, 128])
    with pytest.raises(subsets.ScoringPlanError, match="no features given"):
        subsets.check_ids([], 128, "x")
    sample = subsets.sample_features(1_048_576, 500, seed=7)
    assert len(set(sample.tolist())) == 500 and sample.tolist() == sorted(sample.tolist())
    assert np.array_equal(sample, subsets.sample_features(1_048_576, 500, seed=7))
    with pytest.raises(subsets.ScoringPlanError, match="between 1 and 128"):
        subsets.sample_features(128, 0)


# ---------------------------------------------------------------------------------------------------
# Cost


def test_cost_is_measured_and_a_run_above_the_confirmed_cost_is_refused(tiny_lm):
    sae = make_tiny_sae(arch="jumprelu", layer=2)
    rates = subsets.measure_rates(tiny_lm, sae, _corpus(tiny_lm), probe_features=32, probe_encode_features=64)
    for value in (rates.forward_s_per_token, rates.encode_s_per_feature_token, rates.lens_s_per_feature, rates.output_s_per_feature):
        assert math.isfinite(value) and value > 0
    est = rates.estimate(1_048_576, 200_000)
    assert est.total_s == pytest.approx(est.fixed_s + 1_048_576 * est.per_feature_s)
    assert est.encode_s == pytest.approx(rates.encode_s_per_feature_token * 200_000)
    assert rates.estimate(2_000, 200_000).total_s < est.total_s
    assert "per feature" in est.summary() and "1,048,576 features" in est.summary()
    assert est.memory_bytes == subsets.memory_bytes(1_048_576) > 50e9  # why 1m features are not scored whole on a laptop

    width = 1_048_576
    with pytest.raises(subsets.ScoringPlanError, match="confirm this cost first"):
        subsets.check_plan(est, width, confirmed_s=None)
    subsets.check_plan(est, width, confirmed_s=est.total_s)  # confirmed: allowed (memory not checked here)
    bigger = rates.estimate(width, 400_000)
    with pytest.raises(subsets.ScoringPlanError, match="more than the .* you confirmed"):
        subsets.check_plan(bigger, width, confirmed_s=est.total_s)
    with pytest.raises(subsets.ScoringPlanError, match="GB for the activation pass.*score a subset"):
        subsets.check_plan(est, width, confirmed_s=est.total_s, available=8 * 2**30)
    small = subsets.CostEstimate(2_000, 200_000, 10.0, 1e-3, 1e-2, 1e-2, subsets.memory_bytes(2_000), "cpu")
    subsets.check_plan(small, width, confirmed_s=None, available=8 * 2**30)  # a short subset run needs no confirmation


# ---------------------------------------------------------------------------------------------------
# Neuronpedia


def test_neuronpedia_link_is_built_from_the_yaml_id(tiny_sae):
    scope = gemmascope.find(SCOPE_RELEASE, SCOPE_ID)
    assert neuronpedia.feature_url(scope.neuronpedia_id, 4242) == "https://www.neuronpedia.org/gemma-3-270m/12-gemmascope-2-res-16k/4242"
    assert neuronpedia.neuronpedia_id(tiny_sae) is None
    with pytest.raises(ValueError, match="not a Neuronpedia id"):
        neuronpedia.feature_url("javascript:alert(1)", 1)
    with pytest.raises(ValueError, match="non-negative"):
        neuronpedia.feature_url(scope.neuronpedia_id, -1)


def _export_from_pass(lm, stats, features, path: Path) -> None:
    """Write what Neuronpedia exports for each feature (the paper's LAYER_FEATURE.json files): its top
    contexts, best first, as token strings with the activation at each token."""
    for f in features:
        records = []
        for slot in range(int(stats.n_contexts[f])):
            ids = stats.win_tokens[f, slot]
            keep = ids >= 0
            records.append({"tokens": lm.tokenizer.convert_ids_to_tokens([int(i) for i in ids[keep]]),
                            "values": [float(v) for v in stats.win_acts[f, slot][keep]]})
        (path / f"{stats.layer}_{f}.json").write_text(json.dumps({"activations": records}))


def test_neuronpedia_export_gives_our_input_scores(tiny_lm, tmp_path):
    sae = make_tiny_sae(arch="jumprelu", layer=2, seed=4)
    corpus = _corpus(tiny_lm, n=80)
    data = compute_many(tiny_lm, [sae], corpus, n_tokens=None, cache=False)[0]
    stats = activation_pass(tiny_lm, [sae], corpus)[0]
    features = [int(f) for f in range(sae.width) if stats.n_contexts[f] >= 1][:40]
    _export_from_pass(tiny_lm, stats, features, tmp_path)
    exports = neuronpedia.read_exports([tmp_path])
    assert sorted(exports) == features
    scores = neuronpedia.input_scores_from_exports(exports, data.lens, tiny_lm.tokenizer)
    ours = data.table.set_index("feature")["input_score"]
    checked = 0
    for f in features:
        if math.isnan(ours[f]):
            assert math.isnan(scores[f])
        else:
            assert scores[f] == pytest.approx(ours[f], abs=1e-12)
            checked += 1
    assert checked >= 10
    few = next(f for f in features if stats.n_contexts[f] >= 3)
    assert math.isnan(neuronpedia.input_scores_from_exports({few: exports[few][:9]}, data.lens, tiny_lm.tokenizer)[few])
    shown = neuronpedia.contexts(exports[features[0]], limit=2)
    assert shown[0].activation == pytest.approx(float(stats.top_acts[features[0], 0]))


def test_bad_exports_get_clear_messages(tmp_path, tiny_lm):
    lens = compute_many(tiny_lm, [make_tiny_sae(arch="jumprelu")], None, only="output", cache=False)[0].lens
    cases = {
        "not json": (b"{", "is not JSON"),
        "no activations": (json.dumps({"index": 3}), "needs an 'activations' list"),
        "mismatch": (json.dumps({"index": 3, "activations": [{"tokens": ["a", "b"], "values": [1.0]}]}), "2 tokens but 1 values"),
        "bad value": (json.dumps({"index": 3, "activations": [{"tokens": ["a"], "values": ["x"]}]}), "not a number"),
        "no feature": (json.dumps({"activations": []}), "names no feature"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(neuronpedia.ExportError, match=message):
            neuronpedia.parse_export(text, f"{name}.json" if name != "no feature" else "export.json")
    assert list(neuronpedia.parse_export(json.dumps({"activations": []}), "12_345.json")) == [345]
    with pytest.raises(neuronpedia.ExportError, match="feature 999 of the export has no logit lens"):
        neuronpedia.input_scores_from_exports({999: ()}, lens, tiny_lm.tokenizer)
    with pytest.raises(neuronpedia.ExportError, match="cannot read"):
        neuronpedia.read_exports([tmp_path / "missing.json"])


def test_cli_scores_a_subset_of_a_gemma_scope_sae_offline(scope_hub, no_network, deep_lm, monkeypatch, tmp_path, capsys):
    import pandas as pd

    from saesteer import models
    from saesteer.__main__ import main

    write_scope_cache(scope_hub)
    monkeypatch.setattr(models, "load_model", lambda spec=None: deep_lm)
    out = tmp_path / "scores.csv"
    assert main(["scores", "--sae", f"{SCOPE_RELEASE}:{SCOPE_ID}", "--features", "7,1,5-6", "--tokens", "3000", "--no-cache", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["feature"].tolist() == [1, 5, 6, 7]
    sae = load_sae(SaeSpec(source="release", release=SCOPE_RELEASE, sae_id=SCOPE_ID), deep_lm)
    from saesteer.corpus import pack_sequences
    from saesteer.corpus import iter_bundled

    full = compute_many(deep_lm, [sae], pack_sequences(deep_lm.tokenizer, iter_bundled("train"), 128), n_tokens=3000, cache=False)[0].subset([1, 5, 6, 7])
    for col in ("output_score", "input_score", "density", "max_activation"):
        np.testing.assert_allclose(table[col].to_numpy(float), full.table[col].to_numpy(float), rtol=1e-5, atol=1e-7, err_msg=col)
    assert main(["scores", "--sae", f"{SCOPE_RELEASE}:layer_12_width_16k_l0_small", "--features", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "layer_12_width_16k_l0_small" in err and "needs the hub once" in err
    assert no_network == []
