"""Starting a feature-data job for an SAE whose features can be scored in part (JumpReLU, such as Gemma Scope 2).

Before anything starts, the page measures what one feature costs on this machine (a few seconds, once per
SAE), shows the estimate for the features chosen (all of them, a random sample, or given ids), and for
large widths or long runs starts only once the user confirmed that estimate (``subsets.check_plan``).
"""

from __future__ import annotations

import streamlit as st

from .. import subsets
from ..cli.scores import parse_features
from . import loaders

SCOPES = {"all": "every feature", "sample": "a random sample", "ids": "the ids I give"}
TOKENS = [20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000]
_CONFIRMED = "cp_confirmed_s"


def applies(sae) -> bool:
    return subsets.can_restrict(sae)


@st.cache_resource(show_spinner="Measuring what one feature costs on this machine (a few seconds, once per SAE)…", max_entries=16)
def rates(key: str, _lm, _sae) -> subsets.CostRates:
    """:func:`subsets.measure_rates` of the model and SAE that ``key`` (the job key) names, on the bundled corpus."""
    from ..corpus import pack_sequences
    from ..corpus import iter_bundled

    return subsets.measure_rates(_lm, _sae, pack_sequences(_lm.tokenizer, iter_bundled("train"), 128))


def _record(total_s: float) -> None:
    st.session_state[_CONFIRMED] = total_s if st.session_state.get("cp_confirm") else None


def _chosen(width: int, sae_id: str):
    """(features or None for all, problem or None) from the scope widgets."""
    default = "sample" if width >= subsets.CONFIRM_WIDTH else "all"
    scope = st.radio("Score", list(SCOPES), index=list(SCOPES).index(default), format_func=SCOPES.get, key="cp_scope", horizontal=True)
    if scope == "sample":
        c1, c2 = st.columns(2)
        n = c1.number_input("Features in the sample", min_value=1, max_value=width, value=min(2048, width), step=256, key="cp_sample_n")
        seed = c2.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="cp_seed")
        return subsets.sample_features(width, int(n), int(seed)), None
    if scope == "ids":
        text = st.text_input("Feature ids", key="cp_ids", placeholder="e.g. 12, 40-45, 1031")
        if not text.strip():
            return None, "type the feature ids to score, e.g. 12, 40-45"
        try:
            return subsets.check_ids(parse_features(text), width, sae_id), None
        except ValueError as exc:
            return None, str(exc).replace("--features: ", "")
    return None, None


def render(ctx) -> None:
    """The choice of features, the measured estimate, the confirmation where needed, and the start button."""
    sae = ctx.sae
    width = sae.width
    try:
        measured = rates(loaders.job_key(ctx.model_name, sae), ctx.lm, sae)
    except Exception as exc:  # no corpus, out of memory...: nothing can start, and the page says why
        st.error(f"Could not measure what scoring costs here: {exc.__class__.__name__}: {exc}")
        return
    features, problem = _chosen(width, sae.id)
    n_tokens = st.select_slider("Corpus tokens for the input side", options=TOKENS, value=200_000, key="cp_tokens")
    if problem:
        st.warning(problem)
        return
    estimate = measured.estimate(width if features is None else len(features), n_tokens)
    st.info(f"Estimated from a measurement on this machine ({measured.probe}): {estimate.summary()}.")
    confirmed = None
    if subsets.needs_confirmation(estimate, width):
        st.checkbox(f"I want to start ≈ {subsets.format_duration(estimate.total_s)} of work on {estimate.device}", key="cp_confirm",
                    on_change=_record, args=(estimate.total_s,))
        confirmed = st.session_state.get(_CONFIRMED) if st.session_state.get("cp_confirm") else None
    if st.button("Compute feature scores", type="primary", key="cp_start"):
        try:
            subsets.check_plan(estimate, width, confirmed, subsets.available_memory(str(ctx.lm.device)))
        except subsets.ScoringPlanError as exc:
            st.error(str(exc))
            return
        loaders.start_feature_job(ctx.model_name, ctx.lm, sae, n_tokens=n_tokens, features=None if features is None else features.tolist())
        st.rerun()


def offer_feature(ctx, data, feature: int) -> None:
    """For feature data of a subset without ``feature``: say so, and offer to score the subset plus it."""
    subset = data.meta.get("subset")
    if not subset:
        st.warning(f"feature {feature} has no row in the scores table")
        return
    st.info(f"Feature {feature} is not among the {subsets.subset_label(data.meta)} scored so far.")
    job = loaders.jobs().get(loaders.job_key(ctx.model_name, ctx.sae))
    if job is not None and job.running:
        st.caption(f"A scoring job is running: {job.message}")
        return
    ids = sorted({*subset["features"], int(feature)})
    measured = rates(loaders.job_key(ctx.model_name, ctx.sae), ctx.lm, ctx.sae)
    tokens = int(data.meta.get("n_tokens") or 200_000)
    estimate = measured.estimate(len(ids), tokens)
    if st.button(f"Score these {len(ids):,} features again, with {feature} ({estimate.summary()})", key="fc_add_feature"):
        try:
            subsets.check_plan(estimate, ctx.sae.width, None, subsets.available_memory(str(ctx.lm.device)))
        except subsets.ScoringPlanError as exc:
            st.error(f"{exc} (use the compute panel's confirmation for a run this long)")
            return
        loaders.start_feature_job(ctx.model_name, ctx.lm, ctx.sae, n_tokens=tokens, features=ids)
        st.rerun()
