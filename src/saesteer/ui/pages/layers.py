"""Layers overview: score distributions per layer, shares above thresholds, and input-vs-output scatter."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ... import plots
from ...config import EMBEDDED_MODEL
from ..common import require_data
from ..context import AppContext
from ..nav import goto
from ..session import select_feature
from ..tables import threshold_shares, zero_input_note

# Measured on the embedded model alone (benchmarks/input_score_lens.py --token-means, README "Why the SAEs were rebuilt")
EMBEDDED_INPUT_CAUSE = (
    "On Gemma 3 270M this comes from the model: after its first block, its residual no longer points at the current "
    "token in the logit lens. The mean residual on a token, minus the mean over all tokens, has that token among its "
    "top-20 lens tokens for 76 % of frequent tokens at layer 0 and for 12 % at layer 2. So features here fire on a token but "
    "rarely promote it. The score is kept as the paper defines it."
)


def activation_vs_effect(table: pd.DataFrame, input_min: float, output_min: float) -> str:
    """One paragraph, from the data, on how little a high input score says about the output score."""
    with_input = table.dropna(subset=["input_score"])
    high_in = with_input[with_input["input_score"] >= input_min]
    both = high_in[high_in["output_score"] >= output_min]
    high_out = table[table["output_score"] >= output_min]
    rho = with_input["input_score"].corr(with_input["output_score"], method="spearman") if len(with_input) > 2 else float("nan")
    parts = [f"**Activation is not effect.** Of the {len(high_in):,} features whose top contexts are mostly about their own output tokens (input score ≥ {input_min:g})"]
    if len(high_in):
        parts.append(f", only {len(both):,} ({len(both) / len(high_in):.0%}) also move the model's next word toward those tokens when amplified (output score ≥ {output_min:g}).")
    else:
        parts.append(", none are left at this threshold.")
    parts.append(f" {len(high_out):,} features pass the output threshold.")
    if rho == rho:
        parts.append(f" Across features the two scores have a rank correlation of {rho:.2f}:")
        parts.append(" knowing what makes a feature fire says little about what it does. To steer, pick features by output score.")
    return "".join(parts)


def render(ctx: AppContext) -> None:
    st.title("Layers overview")
    st.caption(
        "Input score: how often a feature's top activating contexts peak on the tokens it promotes (what it *reads*). "
        "Output score: how strongly amplifying it makes the model predict those tokens (what it *does*)."
    )
    data = require_data(ctx)
    frames = ctx.sources.layer_tables(ctx.model_name, ctx.choices, ctx.sae, data)
    c1, c2, c3 = st.columns(3)
    input_min = c1.slider("Input-score threshold", 0.0, 1.0, 0.5, 0.05, key="ov_input_min")
    output_min = c2.slider("Output-score threshold", 0.0, 1.0, 0.01, 0.001, key="ov_output_min", format="%.3f")
    kind = c3.radio("Distribution", ["box", "violin"], horizontal=True, key="ov_kind")

    st.subheader("Score distributions per layer")
    st.plotly_chart(plots.score_distributions(frames, kind=kind), key="ov_dist")
    shares = threshold_shares(frames, input_min, output_min)
    left, right = st.columns(2)
    left.plotly_chart(plots.threshold_share_bars(shares), key="ov_shares_chart")
    right.dataframe(
        shares,
        hide_index=True,
        column_config={
            "with_input_score": st.column_config.NumberColumn("with input score"),
            "input_share": st.column_config.NumberColumn("input ≥ t", format="percent"),
            "output_share": st.column_config.NumberColumn("output ≥ t", format="percent"),
            "both_share": st.column_config.NumberColumn("both", format="percent"),
            "median_input": st.column_config.NumberColumn("median input", format="%.2f"),
            "median_output": st.column_config.NumberColumn("median output", format="%.4f"),
        },
        key="ov_shares_table",
    )
    note = zero_input_note(frames)
    if note:
        st.info(note + (" " + EMBEDDED_INPUT_CAUSE if ctx.model_name == EMBEDDED_MODEL else ""))

    layer = ctx.sae.layer
    table = frames.get(layer, data.table)
    st.subheader(f"Layer {layer}: input score against output score")
    st.markdown(activation_vs_effect(table, input_min, output_min))
    n_missing = int(table["input_score"].isna().sum())
    if n_missing:
        st.caption(f"{n_missing:,} features have too few recorded contexts for an input score and are not plotted.")
    fig = plots.score_scatter(table, input_min, output_min, highlight=ctx.feature)
    event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key="ov_scatter")
    feature = selected_point_feature(event)
    st.caption("Click a point to open that feature.")
    if feature is not None:
        select_feature(feature)
        goto("card")


def selected_point_feature(event) -> int | None:
    """The feature id of the first selected scatter point (from its customdata), if any."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    for point in points:
        custom = point.get("customdata")
        if custom is not None and len(custom):
            return int(custom[0])
    return None
