"""Features side by side: ranked by input score (left) and by output score (right), paged and filterable."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ..common import require_data
from ..context import AppContext
from ..exports import scores_csv
from ..nav import goto
from ..session import select_feature
from ..tables import filter_features, n_pages, page_of, ranked, selected_feature, split_tokens

PAGE_SIZES = (25, 50, 100, 250)


SHOWN_TOKENS = 8


def _column_config(max_output: float) -> dict:
    return {
        "rank": st.column_config.NumberColumn("#", width=44),
        "feature": st.column_config.NumberColumn("feature", format="%d", width=64),
        "input_score": st.column_config.ProgressColumn("input score", min_value=0.0, max_value=1.0, format="%.2f", width=110),
        "output_score": st.column_config.ProgressColumn("output score", min_value=0.0, max_value=max(max_output, 1e-9), format="%.4f", width=120),
        "max_activation": st.column_config.NumberColumn("max act", format="%.3g", width=64),
        "density": st.column_config.NumberColumn("density", format="%.1e", width=70),
        "top_tokens": st.column_config.TextColumn("logit-lens top tokens", width="large"),
    }


def _short(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["top_tokens"] = out["top_tokens"].map(lambda s: " | ".join(split_tokens(s)[:SHOWN_TOKENS]))
    return out


def render(ctx: AppContext) -> None:
    st.title("Features side by side")
    st.caption(
        "Left: features ranked by **input score** — their top activating contexts peak on the tokens they promote. "
        "Right: ranked by **output score** — amplifying them makes the model say those tokens. "
        "The two lists differ: the paper's point is to steer with the right-hand ones. Select a row to open its card."
    )
    data = require_data(ctx)
    table: pd.DataFrame = data.table
    c1, c2, c3, c4 = st.columns([2, 2, 3, 1])
    input_min = c1.slider("Min input score", 0.0, 1.0, 0.0, 0.05, key="fs_input_min")
    output_min = c2.slider("Min output score", 0.0, 1.0, 0.0, 0.001, key="fs_output_min", format="%.3f")
    search = c3.text_input("Search logit-lens tokens", key="fs_search", placeholder="e.g. apple")
    page_size = c4.selectbox("Rows", PAGE_SIZES, index=1, key="fs_page_size")
    shown = filter_features(table, input_min, output_min, search)
    pages = n_pages(len(shown), page_size)
    if st.session_state.get("fs_page", 1) > pages:
        st.session_state["fs_page"] = pages
    st.session_state.setdefault("fs_page", 1)
    p1, p2 = st.columns([1, 4])
    page = p1.number_input(f"Page (of {pages})", min_value=1, max_value=pages, step=1, key="fs_page")
    p2.markdown(f"<div style='padding-top: 2.1em'>{len(shown):,} of {len(table):,} features match</div>", unsafe_allow_html=True)

    config = _column_config(float(table["output_score"].max() or 0.0))
    left, right = st.columns(2)
    by_input = _short(page_of(ranked(shown, "input_score"), page, page_size)[["rank", "feature", "input_score", "max_activation", "density", "top_tokens"]])
    by_output = _short(page_of(ranked(shown, "output_score"), page, page_size)[["rank", "feature", "output_score", "input_score", "top_tokens"]])
    with left:
        st.markdown("**By input score** (what makes it fire)")
        ev_in = st.dataframe(by_input, hide_index=True, column_config=config, on_select="rerun", selection_mode="single-row", key="fs_by_input", height=min(38 + 35 * len(by_input), 720))
    with right:
        st.markdown("**By output score** (what it does)")
        ev_out = st.dataframe(by_output, hide_index=True, column_config=config, on_select="rerun", selection_mode="single-row", key="fs_by_output", height=min(38 + 35 * len(by_output), 720))
    st.download_button("Download all scores (CSV)", scores_csv(table), file_name=f"scores-{ctx.sae.id.replace('/', '_')}.csv", mime="text/csv", key="fs_csv", on_click="ignore")
    feature = selected_feature(ev_in, by_input)
    if feature is None:
        feature = selected_feature(ev_out, by_output)
    if feature is not None:
        select_feature(feature)
        goto("card")
