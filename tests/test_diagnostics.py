"""Dense-latent diagnostics against a brute-force count, and what sets paper-mode strength at a prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saesteer.diagnostics import diagnose, from_dict, prompt_strength
from saesteer.steering import capture_residuals
from saesteer.testing import make_tiny_sae


def _planted():
    """A fresh tiny SAE (the shared fixture must not change) whose latent 5 fires on every token (a huge encoder
    bias), so it is the peak everywhere."""
    sae = make_tiny_sae(layer=2)
    with torch.no_grad():
        sae.sae.b_enc[5] = 50.0
    return sae


def test_diagnose_equals_a_direct_count():
    sae = _planted()
    x = torch.randn(300, 64)
    d = diagnose(sae, x, batch=64)
    with torch.no_grad():
        a = sae.sae.encode(x)
    density = (a > 0).float().mean(0).numpy()
    peak = a.argmax(1).numpy()
    norms = np.array([float(sae.directions([f]).norm()) for f in range(sae.width)])
    share = a.max(1).values.detach().numpy() * norms[peak] / x.norm(dim=1).numpy()
    assert d.n_tokens == 300 and d.n_dense == int((density > 0.5).sum())
    assert d.peak_is_dense == pytest.approx(float((density[peak] > 0.5).mean()))
    assert d.median_peak_share == pytest.approx(float(np.median(share)), rel=1e-5)
    assert d.median_peak_density == pytest.approx(float(np.median(density[peak])))
    top = d.dense_latents[0]
    assert top.latent == 5 and top.density == 1.0 and top.peak_share == pytest.approx(float((peak == 5).mean()))
    fires = a[:, 5] > 0
    assert top.norm_share == pytest.approx(float(np.median((a[fires, 5].detach().numpy() * norms[5] / x[fires].norm(dim=1).numpy()))), rel=1e-5)
    assert "bias-like" in d.summary()
    assert from_dict(d.to_dict()) == d


def test_diagnose_of_an_sae_without_dense_latents():
    sae = make_tiny_sae(seed=3)
    with torch.no_grad():
        sae.sae.b_enc.fill_(-3.0)  # nothing fires unless the input points along it
    d = diagnose(sae, torch.randn(200, 64))
    assert d.n_dense == 0 and d.dense_latents == [] and d.peak_is_dense == 0.0
    assert "a real feature" in d.summary()
    with pytest.raises(ValueError, match="tokens > 0"):
        diagnose(sae, torch.zeros(0, 64))


def test_prompt_strength_names_the_latent_paper_mode_uses(tiny_lm):
    sae = _planted()
    prompt = "the king of france"
    ids = tiny_lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), capture_residuals(tiny_lm, [2]) as acts:
        tiny_lm.model(input_ids=ids)
        a = sae.sae.encode(acts[2][:, -1])[0]
    density = np.full(sae.width, 0.01)
    density[5] = 1.0
    ps = prompt_strength(tiny_lm, sae, prompt, density)
    assert ps.latent == int(a.argmax()) == 5
    assert ps.activation == pytest.approx(float(a.max()))
    assert ps.resid_norm == pytest.approx(float(acts[2][0, -1].norm()))
    norm = float(sae.directions([7]).norm())
    assert ps.amp1_share(norm) == pytest.approx(ps.activation * norm / ps.resid_norm)
    text = ps.explain(norm)
    assert "set by latent 5, which fires on every token" in text and text.startswith("amp 1 adds ")
    assert "density is not measured" in prompt_strength(tiny_lm, sae, prompt).explain(norm)


def test_bundled_diagnostics_come_from_the_manifest():
    from saesteer.config import EMBEDDED_MODEL
    from saesteer.diagnostics import bundled_diagnostics
    from saesteer.saes import list_bundled

    entries = list_bundled(EMBEDDED_MODEL)
    assert entries, "the bundle ships SAEs"
    for e in entries:
        d = bundled_diagnostics(EMBEDDED_MODEL, e["id"])
        assert d is not None and d.to_dict() == e["diagnostics"]
        assert d.peak_is_dense <= 0.1 and d.median_peak_share <= 0.1  # issue 12's targets, as measured at build time
    assert bundled_diagnostics(EMBEDDED_MODEL, "no-such-sae") is None


@pytest.mark.slow
def test_measured_diagnostics_agree_with_the_manifest(embedded_lm):
    """Measure, not re-read: the layer-8 SAE's diagnostics on the first ~2k held-out tokens against its manifest
    entry (measured on all 138k). The median peak share is a median over tokens, stable on a slice (0.0562 here
    against 0.0567; layers 2 and 5 give 0.048 and 0.069, so 5 % tells the layers apart); densities are noisier
    on 2k tokens (the peak's median density 0.0222 against 0.0200), hence 25 % there. No latent is dense in
    either (n_dense 0, peak_is_dense 0)."""
    from saesteer.config import SaeSpec
    from saesteer.diagnostics import bundled_diagnostics, measure
    from saesteer.saes import load_sae

    sae = load_sae(SaeSpec(source="bundled", layer=8), embedded_lm)
    shipped = bundled_diagnostics(embedded_lm.name, sae.id)
    got = measure(embedded_lm, sae, n_tokens=2048)
    assert 2048 <= got.n_tokens < shipped.n_tokens
    assert got.n_dense == shipped.n_dense and got.peak_is_dense == pytest.approx(shipped.peak_is_dense, abs=0.02)
    assert got.median_peak_share == pytest.approx(shipped.median_peak_share, rel=0.05)
    assert got.median_peak_density == pytest.approx(shipped.median_peak_density, rel=0.25)


def test_densities_places_each_feature_and_leaves_the_rest_unknown():
    from saesteer.diagnostics import densities

    out = densities(np.array([3, 0]), np.array([0.5, 0.25]), 5)
    assert out[3] == 0.5 and out[0] == 0.25 and np.isnan(out[[1, 2, 4]]).all()
