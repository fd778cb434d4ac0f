"""Concept search page: type a concept, find the features that promote it, ranked by output score."""

from __future__ import annotations

import streamlit as st

from ..common import require_data
from ..context import AppContext
from ..data import max_tokens_by_feature
from ..nav import goto
from ..render import md_token
from ..search import concept_tokens, search_concept
from ..session import STRENGTH, select_feature, steer_with
from ..tables import selected_feature


def render(ctx: AppContext) -> None:
    st.title("Concept search")
    st.caption(
        "The paper's Figure 1 workflow: find features whose logit lens promotes a concept's tokens, then rank them by "
        "**output score** — whether amplifying them actually makes the model say the concept. The input score is shown "
        "beside it: a feature can fire on a concept without producing it."
    )
    data = require_data(ctx)
    c1, c2, c3 = st.columns([3, 2, 2])
    concept = c1.text_input("Concept", key="cs_concept", placeholder="apple, France, music…")
    use_contexts = c2.checkbox("Also match top contexts", value=True, key="cs_contexts", help="features whose top contexts peak on the concept")
    use_pieces = c3.checkbox("Match word pieces", value=False, key="cs_pieces", help="for concepts the tokenizer splits into several tokens")
    if not concept.strip():
        st.info("Type a concept to search.")
        return
    targets = concept_tokens(concept, ctx.lm.tokenizer)
    st.markdown("Matching tokens: " + ", ".join(md_token(t) for t in sorted(targets.whole)) + (" · pieces: " + ", ".join(md_token(t) for t in sorted(targets.pieces)) if targets.pieces and use_pieces else ""))
    lookup = max_tokens_by_feature(data) if use_contexts else None
    result = search_concept(data.table, targets, (lambda f: lookup.get(f, [])) if lookup is not None else None, use_pieces=use_pieces)
    if result.empty:
        st.warning(f"No feature of SAE {ctx.sae.id} promotes {md_token(concept)} in its top lens tokens" + (" or peaks on it in its top contexts." if use_contexts else "."))
        return
    st.markdown(f"**{len(result)} features** match. Best by output score: feature **{int(result['feature'].iloc[0])}**.")
    event = st.dataframe(
        result,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key="cs_results",
        column_config={
            "output_score": st.column_config.ProgressColumn("output score", min_value=0.0, max_value=max(float(result["output_score"].max()), 1e-9), format="%.4f"),
            "input_score": st.column_config.ProgressColumn("input score", min_value=0.0, max_value=1.0, format="%.2f"),
            "context_share": st.column_config.NumberColumn("contexts on concept", format="percent"),
            "top_tokens": st.column_config.TextColumn("logit-lens top tokens", width="large"),
        },
    )
    if st.button(f"Steer with feature {int(result['feature'].iloc[0])}", type="primary", key="cs_steer"):
        steer_with([(int(result["feature"].iloc[0]), float(st.session_state.get(STRENGTH) or 4.0))])
    feature = selected_feature(event, result)
    if feature is not None:
        select_feature(feature)
        goto("card")
