"""Guards every page starts with, and the feature-data computation panel."""

from __future__ import annotations

import time

import streamlit as st

from . import loaders, score_plan
from .context import AppContext


def require_sae(ctx: AppContext) -> None:
    """Stop the page (with the reason shown) unless a model and an SAE are loaded."""
    if ctx.lm is None or ctx.sae is None:
        for problem in ctx.errors or ["pick a model and an SAE in the sidebar"]:
            st.error(problem)
        st.stop()


def require_data(ctx: AppContext) -> object:
    """The feature data of the selected SAE; if there is none yet, offer to compute it and stop the page."""
    require_sae(ctx)
    if ctx.data is not None:
        return ctx.data
    st.info(
        f"No feature scores for SAE **{ctx.sae.id}** yet. Bundled SAEs of the embedded model ship with them; "
        "for other SAEs they are computed once (a pass over a corpus for the input side, a batched output-score "
        "pass for the effect side) and then cached on disk."
    )
    compute_panel(ctx)
    st.stop()


def compute_panel(ctx: AppContext) -> None:
    key = loaders.job_key(ctx.model_name, ctx.sae)
    job = loaders.jobs().get(key)
    if job is not None and job.running:
        _job_progress(key)
        return
    if job is not None and job.error is not None:
        st.error(f"The last computation failed: {job.error}")
    elif job is not None and job.done:
        st.warning(f"A computation finished but left no data in {job.target}; compute again.")
    if score_plan.applies(ctx.sae):  # JumpReLU and ReLU SAEs: all or some features, the measured cost first
        score_plan.render(ctx)
        return
    n_tokens = st.select_slider("Corpus tokens for the input side", options=[20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000], value=200_000, key="cp_tokens")
    if st.button("Compute feature scores", type="primary", key="cp_start"):
        loaders.start_feature_job(ctx.model_name, ctx.lm, ctx.sae, n_tokens=n_tokens)
        st.rerun()


@st.fragment(run_every=1.0)
def _job_progress(key: str) -> None:
    job = loaders.jobs().get(key)
    if job is None:
        return
    if not job.running:
        st.rerun(scope="app")
    elapsed = time.time() - job.started
    st.progress(job.progress, text=f"{job.message} · {elapsed:.0f} s (you can leave this page; the result is cached on disk)")
