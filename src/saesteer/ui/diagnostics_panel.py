"""SAE diagnostics on the pages: is the SAE's largest latent a real feature, and what a paper-mode amp means.

The sidebar shows one line per SAE (from the manifest for a bundled SAE; measured on request on held-out text
for any other); the feature card and the lab say in plain words what a paper-mode strength adds
(``diagnostics.PromptStrength.explain``).
"""

from __future__ import annotations

import streamlit as st

from .. import diagnostics
from ..diagnostics import PromptStrength, SaeDiagnostics
from .loaders import data_key, weights_fingerprint

MEASURE_TOKENS = 8192
"""Held-out tokens the sidebar's 'Measure' button encodes (a few seconds on a CPU for the embedded model)."""


def _key(model_name: str, sae) -> str:
    # The weights fingerprint tells two SAEs of one name apart (an object's id would be reused once it is freed).
    return f"{model_name}|{sae.id}|{sae.hook_name}|{sae.width}|{weights_fingerprint(sae)}"


@st.cache_resource(show_spinner=False, max_entries=32)
def _measured(key: str, _lm, _sae, n_tokens: int) -> SaeDiagnostics:
    return diagnostics.measure(_lm, _sae, n_tokens)


@st.cache_resource(show_spinner=False, max_entries=256)
def _strength(key: str, prompt: str, _lm, _sae, _density) -> PromptStrength:
    return diagnostics.prompt_strength(_lm, _sae, prompt, _density)


def known(ctx) -> SaeDiagnostics | None:
    """The SAE's diagnostics: the bundle's own, or this session's measurement; None when not measured."""
    if ctx.sae is None:
        return None
    found = diagnostics.bundled_diagnostics(ctx.model_name, ctx.sae.id) if ctx.choice is not None and ctx.choice.spec.source == "bundled" else None
    return found or st.session_state.get(f"diag:{_key(ctx.model_name, ctx.sae)}")


def sidebar(ctx) -> None:
    """One line under the SAE caption, with the dense latents in an expander and a button to measure any SAE."""
    if ctx.sae is None or ctx.lm is None:
        return
    d = known(ctx)
    if d is None:
        st.caption("Peak-latent diagnostics: not measured for this SAE.")
        if st.button(f"Measure on {MEASURE_TOKENS:,} held-out tokens", key="sb_diag_measure",
                     help="Is the largest latent at each token a real feature, or a bias-like latent that fires on every token?"):
            try:
                with st.spinner("Encoding held-out text…"):
                    d = _measured(_key(ctx.model_name, ctx.sae), ctx.lm, ctx.sae, MEASURE_TOKENS)
                st.session_state[f"diag:{_key(ctx.model_name, ctx.sae)}"] = d
            except Exception as exc:  # the held-out corpus missing, a model without the layer...: say so, keep the app up
                st.error(f"Could not measure the diagnostics: {exc}")
                return
        else:
            return
    icon = "⚠️ " if d.peak_is_dense >= 0.5 else ""
    st.caption(icon + d.summary())
    if d.dense_latents:
        with st.expander(f"{d.n_dense} latents fire on > {100 * d.dense_threshold:.0f} % of tokens"):
            st.dataframe([{"latent": x.latent, "density": round(x.density, 4), "peak at (share of tokens)": round(x.peak_share, 4),
                           "share of residual norm": round(x.norm_share, 4)} for x in d.dense_latents], hide_index=True)


def strength(ctx, prompt: str) -> PromptStrength | None:
    """What sets paper-mode strength at ``prompt``'s last position for the current SAE (cached); None if unavailable."""
    if ctx.sae is None or ctx.lm is None or not prompt:
        return None
    density, key = None, _key(ctx.model_name, ctx.sae)
    if ctx.data is not None and "density" in ctx.data.table:
        density = diagnostics.densities(ctx.data.table["feature"].to_numpy(), ctx.data.table["density"].to_numpy(), ctx.sae.width)
        key += f"|{data_key(ctx.data)}"  # the densities come from the feature data
    try:
        return _strength(key, prompt, ctx.lm, ctx.sae, density)
    except Exception:  # an empty tokenisation, a model error: the caption is a help, never a failure
        return None


def explain(ctx, prompt: str, feature: int, amp: float) -> str | None:
    """'amp 4 adds 23 % of the residual norm here, set by latent 1234, which fires on 3.1 % of tokens', or None."""
    ps = strength(ctx, prompt)
    if ps is None or not 0 <= feature < ctx.sae.width:
        return None
    norm = float(ctx.sae.directions([feature]).float().norm())
    return ps.explain(norm, amp)


def caption(ctx, prompt: str, feature: int, amp: float, where: str = "") -> None:
    """The plain-words strength as a caption (nothing when it cannot be computed)."""
    text = explain(ctx, prompt, feature, amp)
    if text:
        st.caption(f"{where}{text[0].upper() + text[1:]}.")


__all__ = ["MEASURE_TOKENS", "caption", "explain", "known", "sidebar", "strength"]
