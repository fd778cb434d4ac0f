"""Figures and the self-contained HTML report of a concept-level run (plotly is imported where used)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from . import layout
from .params import METHODS, SAE_METHODS
from .results import EvalResults, method_table, strength_curves


_COLORS = {
    "sae_output": "#d62728", "sae_input": "#1f77b4", "sae_random": "#7f7f7f", "diffmean": "#2ca02c",
    "lora": "#9467bd", "prompt": "#ff7f0e", "unsteered": "#000000",
}


def fig_methods(table: pd.DataFrame):
    """Grouped bars: mean concept score, fluency and combined score per method (± standard error)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for metric, name in (("concept_score", "concept"), ("fluency", "fluency"), ("combined", "combined")):
        if metric not in table.columns:
            continue
        fig.add_trace(go.Bar(
            x=list(table["method"]), y=table[metric], name=name,
            error_y=dict(type="data", array=table.get(f"{metric}_sem", pd.Series(np.nan, index=table.index)).fillna(0)),
        ))
    n = int(table["n_concepts"].max()) if len(table) else 0
    fig.update_layout(barmode="group", height=380, yaxis=dict(range=[0, 1.05], title="mean over concepts (test half)"),
                      title=f"Steering methods on {n} concepts", margin=dict(l=50, r=20, t=50, b=40))
    return fig


def fig_strength_curves(curves: pd.DataFrame):
    """Concept score and combined score against strength (train half, mean over concepts), one line per method.
    (Fluency is left out: on the train half it is only computed for rows that mention the concept.)"""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("concept score", "combined score"))
    for m, part in curves.groupby("method", sort=False):
        part = part.sort_values("strength")
        for col, metric in ((1, "concept_score"), (2, "combined")):
            fig.add_trace(go.Scatter(x=part["strength"], y=part[metric], mode="lines+markers", name=m, legendgroup=m,
                                     showlegend=col == 1, line_color=_COLORS.get(m)), row=1, col=col)
    positive = bool(len(curves)) and bool((curves["strength"] > 0).all())
    fig.update_xaxes(title_text="strength", type="log" if positive else "linear")
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(height=360, margin=dict(l=50, r=20, t=40, b=40))
    return fig


def fig_concepts(summary: pd.DataFrame, metric: str = "combined"):
    """Heatmap of ``metric`` per concept (rows) and method (columns) on the test half."""
    import plotly.graph_objects as go

    from ..text import escape

    if summary.empty:
        return go.Figure()
    pivot = summary.pivot_table(index="concept", columns="method", values=metric)
    pivot = pivot[[m for m in METHODS if m in pivot.columns]]
    fig = go.Figure(go.Heatmap(z=pivot.to_numpy(), x=list(pivot.columns), y=[escape(c, whitespace=True) for c in pivot.index], zmin=0, zmax=1,
                               colorscale="Viridis", hovertemplate="%{y} · %{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(height=max(300, 18 * len(pivot) + 80), margin=dict(l=100, r=20, t=30, b=40), title=f"{metric} per concept")
    return fig


def fig_compare(table: pd.DataFrame, metric: str = "combined"):
    """Grouped bars of ``metric`` per method, one bar group per method and one bar per run (``run`` column)."""
    import plotly.graph_objects as go

    from ..text import escape

    fig = go.Figure()
    for run, part in table.groupby("run", sort=False):
        part = part.set_index("method").reindex([m for m in METHODS if m in set(part["method"])])
        sem = part.get(f"{metric}_sem", pd.Series(np.nan, index=part.index)).fillna(0)
        fig.add_trace(go.Bar(x=list(part.index), y=part[metric], name=escape(run, whitespace=True), error_y=dict(type="data", array=sem)))
    fig.update_layout(barmode="group", height=380, yaxis=dict(title=f"{metric} (test half, mean over concepts)", rangemode="tozero"),
                      margin=dict(l=50, r=20, t=30, b=40), legend_title_text="run")
    return fig


def figures(results: EvalResults) -> dict:
    """All report figures by name."""
    gens = results.generations
    return {
        "methods": fig_methods(results.methods()),
        "strength_sae": fig_strength_curves(strength_curves(gens, SAE_METHODS)),
        "strength_diffmean": fig_strength_curves(strength_curves(gens, ("diffmean",))),
        "concepts": fig_concepts(results.summary()),
    }


def write_report(results: EvalResults, out: str | Path) -> None:
    """Tables (parquet + CSV), figures (plotly JSON) and one self-contained HTML report under ``out``."""
    out = Path(out)
    summary = results.summary()
    table = method_table(summary)
    layout.write_parquet(out / "generations.parquet", results.generations)
    results.generations.to_csv(out / "generations.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    table.to_csv(out / "methods.csv", index=False)
    results.units.to_csv(out / "units.csv", index=False)
    figs = figures(results)
    (out / "figures").mkdir(exist_ok=True)
    parts = []
    for i, (name, fig) in enumerate(figs.items()):
        (out / "figures" / f"{name}.json").write_text(fig.to_json())
        # plotly.js is inlined once so that the report opens offline.
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    head = f"<h1>Steering evaluation: {html.escape(str(results.meta.get('sae_id')))} ({html.escape(str(results.meta.get('model')))})</h1>"
    (out / "report.html").write_text("<html><head><meta charset='utf-8'></head><body>" + head + table.to_html(index=False, float_format="%.3f") + "".join(parts) + "</body></html>")
