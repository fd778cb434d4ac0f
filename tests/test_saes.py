"""SAE loading through sae-lens, the hook-point mapping, and decoder directions."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch

from saesteer import paths, saes
from saesteer.config import SaeSpec
from saesteer.hookpoints import (
    HookPointError,
    hf_module_name,
    hook_layer,
    resolve_module,
    tl_hook_name,
)
from saesteer.saes import SaeLoadError, load_sae
from saesteer.testing import make_tiny_sae


def save(loaded, path):
    loaded.sae.save_model(path)
    return path


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_load_local_sae_directory(tiny_lm, tmp_path, arch):
    original = make_tiny_sae(arch=arch, layer=3)
    loaded = load_sae(SaeSpec(source="local", path=str(save(original, tmp_path / "my-sae"))), tiny_lm)
    assert (loaded.id, loaded.layer, loaded.hook_name) == ("my-sae", 3, "blocks.3.hook_resid_post")
    assert (loaded.width, loaded.d_in) == (128, 64)
    assert type(loaded.sae) is type(original.sae)
    for name, p in original.sae.state_dict().items():
        assert torch.equal(loaded.sae.state_dict()[name], p), name
    x = torch.randn(5, 64)
    assert torch.equal(loaded.sae.encode(x), original.sae.encode(x))


def test_load_bundled_through_manifest(tiny_lm, tmp_path, monkeypatch):
    root = tmp_path / "saes"
    save(make_tiny_sae(layer=1), root / "tiny" / "L1")
    save(make_tiny_sae(layer=2), root / "tiny" / "L2")
    manifest = {"saes": [{"id": f"L{l}", "layer": l, "width": 128, "hook": tl_hook_name(l), "dir": f"L{l}"} for l in (2, 1)]}
    (root / "tiny" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(paths, "BUNDLED_SAES", root)
    assert [e["layer"] for e in saes.list_bundled("tiny")] == [1, 2]
    assert load_sae(SaeSpec(layer=2), tiny_lm, model_name="tiny").id == "L2"
    assert load_sae(SaeSpec(sae_id="L1"), tiny_lm, model_name="tiny").layer == 1
    with pytest.raises(SaeLoadError, match="no bundled SAE for tiny at layer 3; bundled layers: 1, 2"):
        load_sae(SaeSpec(layer=3), tiny_lm, model_name="tiny")


def test_d_in_mismatch_is_refused(tiny_lm, tmp_path):
    path = save(make_tiny_sae(d_in=32), tmp_path / "narrow")
    with pytest.raises(SaeLoadError, match="d_in=32.*width 64"):
        load_sae(SaeSpec(source="local", path=str(path)), tiny_lm)


def test_layer_beyond_model_is_refused(tiny_lm, tmp_path):
    path = save(make_tiny_sae(layer=9), tmp_path / "deep")
    with pytest.raises(SaeLoadError, match="layer 9.*layers 0..3"):
        load_sae(SaeSpec(source="local", path=str(path)), tiny_lm)


def test_not_an_sae_directory(tmp_path):
    with pytest.raises(SaeLoadError, match="cfg.json"):
        load_sae(SaeSpec(source="local", path=str(tmp_path)))


def test_hook_names_both_conventions_map_to_the_same_module(tiny_lm):
    for layer in range(tiny_lm.n_layers):
        assert hook_layer(tl_hook_name(layer)) == hook_layer(hf_module_name(layer)) == layer
        assert resolve_module(tiny_lm, tl_hook_name(layer)) is tiny_lm.layers[layer]
        assert resolve_module(tiny_lm, hf_module_name(layer)) is tiny_lm.layers[layer]
    assert hook_layer("layers.7") == hook_layer("transformer.h.7") == 7


def test_hook_name_that_maps_to_no_module(tiny_lm, tmp_path):
    for bad in ("blocks.2.hook_mlp_out", "blocks.2.attn.hook_z", "model.layers.2.mlp", "embed"):
        with pytest.raises(HookPointError, match="not a residual-stream hook"):
            hook_layer(bad)
    with pytest.raises(HookPointError, match="layers 0..3"):
        resolve_module(tiny_lm, "blocks.4.hook_resid_post")
    loaded = make_tiny_sae()
    loaded.sae.cfg.metadata.hook_name = "blocks.2.hook_mlp_out"
    with pytest.raises(SaeLoadError, match="not a residual-stream hook"):
        load_sae(SaeSpec(source="local", path=str(save(loaded, tmp_path / "mlp"))), tiny_lm)


def test_unknown_release_and_id_fail_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SaeLoadError, match="unknown sae-lens release 'no-such-release'"):
        load_sae(SaeSpec(source="release", release="no-such-release", sae_id="layer_0"))
    with pytest.raises(SaeLoadError, match="has no SAE 'layer_99/width_1k/canonical'"):
        load_sae(SaeSpec(source="release", release="gemma-scope-2b-pt-res-canonical", sae_id="layer_99/width_1k/canonical"))


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_directions_are_decoder_rows_for_plain_saes(arch):
    loaded = make_tiny_sae(arch=arch)
    feats = [0, 5, 127, 5]
    assert torch.allclose(loaded.directions(feats), loaded.sae.W_dec[feats], atol=1e-6, rtol=0)
    assert torch.allclose(loaded.directions(feats, scale=2.5), 2.5 * loaded.sae.W_dec[feats], atol=1e-5, rtol=0)


def test_directions_follow_decoder_norm_rescaling():
    """A TopK SAE with rescale_acts_by_decoder_norm decodes a·W_dec[f]/|W_dec[f]|: take the direction from decode."""
    loaded = make_tiny_sae()
    loaded.sae.cfg.rescale_acts_by_decoder_norm = True
    w = loaded.sae.W_dec
    assert torch.allclose(loaded.directions([3, 9]), w[[3, 9]] / w[[3, 9]].norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)


def test_check_feature():
    loaded = make_tiny_sae()
    loaded.check_feature(0)
    loaded.check_feature(127)
    for bad in (-1, 128, 1.0, True, "3"):
        with pytest.raises(SaeLoadError, match="from 0 to 127"):
            loaded.check_feature(bad)
