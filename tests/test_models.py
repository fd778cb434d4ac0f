"""Model loading (embedded, local directory, hub id offline) and the model's own unembedding."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from saesteer.config import EMBEDDED_MODEL, ConfigError, ModelSpec
from saesteer.models import ModelLoadError, load_model
from saesteer.testing import make_tiny_model


def test_model_spec_validation():
    assert ModelSpec().name == EMBEDDED_MODEL
    for kwargs, match in [
        ({"name": "  "}, "model name is empty"),
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
        ({"device": "tpu"}, "device 'tpu' is not supported"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ModelSpec(**kwargs)
    ModelSpec(device="cuda:1", dtype="bfloat16")  # valid spec; availability is checked at load time


def test_load_local_directory(tmp_path):
    tiny = make_tiny_model()
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = load_model(ModelSpec(name=str(tmp_path), device="cpu"))
    assert lm.describe() | {"name": None} == tiny.describe() | {"name": None}
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    ids = lm.tokenizer("from my experience , the king", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == lm.tokenizer.bos_token_id
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, tiny.model(ids).logits)


def test_local_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelSpec(name=str(tmp_path)))


def test_hub_id_offline_names_the_embedded_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=f"could not load model 'nobody/no-such-model'.*'{EMBEDDED_MODEL}'"):
        load_model(ModelSpec(name="nobody/no-such-model", device="cpu"))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_unembed_matches_the_models_own_logits(softcap):
    """LoadedModel.unembed (final norm, lm_head, soft-capping) on the last block's output = the model's logits."""
    from saesteer.steering import capture_residuals

    lm = make_tiny_model(softcap=softcap)
    ids = lm.tokenizer("the sea and the moon", return_tensors="pt")["input_ids"]
    last = lm.n_layers - 1
    with capture_residuals(lm, [last]) as store, torch.no_grad():
        logits = lm.model(ids).logits
        assert torch.allclose(lm.unembed(store[last]), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_embedded_model_loads_and_steers(embedded_lm):
    from saesteer.testing import make_tiny_sae

    from saesteer import saes
    from saesteer.config import MAX_ABS_STRENGTH, SaeSpec
    from saesteer.steering import capture_residuals, generate, steer

    d = embedded_lm.describe()
    assert (d["name"], d["n_layers"], d["d_model"], d["vocab_size"]) == (EMBEDDED_MODEL, 18, 640, 262144)
    prompt = "From my experience,"
    base = generate(embedded_lm, prompt, max_new_tokens=8)[0]
    assert base.strip()
    bundled = saes.list_bundled()
    if bundled:
        sae = saes.load_sae(SaeSpec(layer=bundled[0]["layer"]), embedded_lm)
    else:
        # No trained SAE shipped: a random sae-lens TopK SAE (untrained; it only exercises the hook path).
        sae = make_tiny_sae(d_in=640, d_sae=64, layer=5, k=8)
    ids = embedded_lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with capture_residuals(embedded_lm, [sae.layer]) as store:
            embedded_lm.model(ids)
        x = store[sae.layer][:, -1]
        acts = sae.sae.encode(x)
        feature = int(acts.argmax())
        with steer(embedded_lm, sae, [feature], [2.0]), capture_residuals(embedded_lm, [sae.layer]) as store:
            embedded_lm.model(ids)
        e = torch.zeros_like(acts)
        e[0, feature] = 2.0 * acts.max()
        expected = x + sae.sae.decode(acts + e) - sae.sae.decode(acts)
        err = (store[sae.layer][:, -1] - expected).abs().max().item()
        assert err <= 1e-5 * expected.abs().max().item()
    zero = generate(embedded_lm, prompt, sae=sae, features=[feature], strengths=[0.0], max_new_tokens=8)[0]
    assert zero == base
    push = MAX_ABS_STRENGTH  # the largest push allowed, along a unit decoder row: about the residual's own norm at L2
    assert push >= 0.5 * float(x.norm())
    pushed = generate(embedded_lm, prompt, sae=sae, features=[feature], strengths=[push], mode="additive", max_new_tokens=8)[0]
    assert pushed != base
    for module in embedded_lm.model.modules():
        assert not module._forward_hooks
