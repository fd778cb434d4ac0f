"""Pure functions from data to plotly figures (no Streamlit, no model).

Every string that comes from a tokenizer is HTML-escaped before it reaches a figure: plotly renders a
subset of HTML (``<a href>``, ``<b>``, ``<br>``) in hover text, titles and tick labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .text import TOKEN_SEP, escape, split_tokens

INPUT_COLOR = "#1f77b4"
OUTPUT_COLOR = "#d62728"
NEUTRAL_COLOR = "#7f7f7f"


def _short_tokens(joined: object, n: int = 6) -> str:
    return TOKEN_SEP.join(escape(p, whitespace=True) for p in split_tokens(joined)[:n])


def score_distributions(frames: Mapping[int, pd.DataFrame], kind: str = "box") -> go.Figure:
    """Input- and output-score distributions per layer, side by side (one box or violin per layer).

    ``frames`` maps layer -> a scores table with ``input_score`` and ``output_score`` columns. Features
    without an input score (too few contexts) are left out of the input panel only.
    """
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Input score (activation)", "Output score (effect)"), shared_yaxes=False)
    trace = go.Box if kind == "box" else go.Violin
    extra = {"boxpoints": False} if kind == "box" else {"points": False, "meanline_visible": True}
    for col, (column, color) in enumerate((("input_score", INPUT_COLOR), ("output_score", OUTPUT_COLOR)), start=1):
        for layer in sorted(frames):
            values = frames[layer][column].dropna().to_numpy()
            fig.add_trace(
                trace(y=values, name=f"L{layer}", marker_color=color, line_color=color, showlegend=False, **extra),
                row=1,
                col=col,
            )
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(height=380, margin=dict(l=40, r=20, t=40, b=40))
    return fig


def threshold_share_bars(shares: pd.DataFrame) -> go.Figure:
    """Grouped bars of the share of features above thresholds, per layer.

    ``shares`` has columns layer, input_share, output_share, both_share (fractions in [0, 1]).
    """
    fig = go.Figure()
    for column, label, color in (
        ("input_share", "input score ≥ threshold", INPUT_COLOR),
        ("output_share", "output score ≥ threshold", OUTPUT_COLOR),
        ("both_share", "both", NEUTRAL_COLOR),
    ):
        fig.add_trace(go.Bar(x=[f"L{l}" for l in shares["layer"]], y=shares[column], name=label, marker_color=color))
    fig.update_layout(barmode="group", height=300, yaxis=dict(title="share of features", tickformat=".0%", range=[0, 1]), margin=dict(l=40, r=20, t=20, b=40), legend=dict(orientation="h", y=1.12))
    return fig


def score_scatter(
    table: pd.DataFrame,
    input_threshold: float | None = None,
    output_threshold: float | None = None,
    highlight: int | None = None,
) -> go.Figure:
    """Input score (x) against output score (y), one point per feature with an input score.

    Each point's ``customdata`` is ``[feature id, top tokens]`` so a selection event names the feature.
    """
    frame = table.dropna(subset=["input_score", "output_score"])
    custom = np.stack([frame["feature"].to_numpy(dtype=object), frame["top_tokens"].map(_short_tokens).to_numpy(dtype=object)], axis=1) if len(frame) else np.empty((0, 2), dtype=object)
    fig = go.Figure(
        go.Scattergl(
            x=frame["input_score"],
            y=frame["output_score"],
            mode="markers",
            marker=dict(size=6, color=frame["output_score"], colorscale="Reds", opacity=0.75, line=dict(width=0)),
            customdata=custom,
            hovertemplate="feature %{customdata[0]}<br>input %{x:.2f} · output %{y:.3f}<br>%{customdata[1]}<extra></extra>",
            name="features",
        )
    )
    if highlight is not None:
        row = frame[frame["feature"] == highlight]
        if len(row):
            fig.add_trace(go.Scatter(x=row["input_score"], y=row["output_score"], mode="markers", marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(width=2, color="black")), hoverinfo="skip", showlegend=False))
    if input_threshold is not None:
        fig.add_vline(x=input_threshold, line_dash="dot", line_color=INPUT_COLOR)
    if output_threshold is not None:
        fig.add_hline(y=output_threshold, line_dash="dot", line_color=OUTPUT_COLOR)
    fig.update_layout(
        height=460,
        xaxis=dict(title="input score: share of top contexts whose max token is a lens token", range=[-0.03, 1.03]),
        yaxis=dict(title="output score: effect on the next token", rangemode="tozero"),
        margin=dict(l=50, r=20, t=20, b=50),
        showlegend=False,
        dragmode="select",
    )
    return fig


def activation_histogram(edges: Sequence[float], counts: Sequence[float], title: str = "") -> go.Figure:
    """Histogram of a feature's non-zero activations from bin ``edges`` (n+1) and ``counts`` (n), log y."""
    edges = np.asarray(edges, dtype=float)
    counts = np.asarray(counts, dtype=float)
    if edges.shape[0] != counts.shape[0] + 1:
        raise ValueError(f"need len(edges) == len(counts) + 1, got {edges.shape[0]} and {counts.shape[0]}")
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centers, y=counts, width=np.diff(edges), marker_color="#ff8c00", hovertemplate="activation %{x:.3g}<br>count %{y}<extra></extra>"))
    fig.update_layout(height=260, title=escape(title, whitespace=True), xaxis_title="activation (non-zero)", yaxis=dict(title="count", type="log"), margin=dict(l=40, r=20, t=40 if title else 10, b=40), bargap=0)
    return fig


def logit_bars(tokens: Sequence[str], logits: Sequence[float], title: str = "", color: str = OUTPUT_COLOR) -> go.Figure:
    """Horizontal bars of logit-lens tokens and their logits, largest on top."""
    labels = [f"{i + 1}. {escape(t, whitespace=True)}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Bar(x=list(logits)[::-1], y=labels[::-1], orientation="h", marker_color=color, hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(height=max(200, 22 * len(labels) + 60), title=escape(title, whitespace=True), margin=dict(l=10, r=10, t=40 if title else 10, b=30), xaxis_title="logit")
    return fig


def sweep_figure(sweep: pd.DataFrame, fluency_column: str = "perplexity") -> go.Figure:
    """Concept-token hits (left axis) and a fluency measure (right axis) against steering strength.

    ``sweep`` has columns strength, concept_hits and ``fluency_column``.
    """
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=sweep["strength"], y=sweep["concept_hits"], mode="lines+markers", name="concept-token hits", line_color=OUTPUT_COLOR), secondary_y=False)
    fig.add_trace(go.Scatter(x=sweep["strength"], y=sweep[fluency_column], mode="lines+markers", name=fluency_column.replace("_", " "), line=dict(color=NEUTRAL_COLOR, dash="dash")), secondary_y=True)
    fig.update_xaxes(title_text="strength", type="log" if (sweep["strength"] > 0).all() and len(sweep) > 2 else "linear")
    fig.update_yaxes(title_text="concept-token hits", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text=fluency_column.replace("_", " ") + (" (lower = more fluent)" if fluency_column == "perplexity" else ""), secondary_y=True, type="log" if fluency_column == "perplexity" else "linear")
    fig.update_layout(height=340, margin=dict(l=50, r=50, t=20, b=40), legend=dict(orientation="h", y=1.15))
    return fig
