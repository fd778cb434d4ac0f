"""Figures and the self-contained HTML report of a concept-level run (plotly is imported where used)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import layout
from .params import KNOWN_METHODS, KNOWN_SAE_METHODS
from .metrics import Z95  # the headline calls a ratio established when ratio ± Z95 standard errors excludes 1
from .results import EvalResults, Ratio, method_table, strength_curves

_COLORS = {
    "sae_activation": "#1f77b4", "sae_output": "#d62728", "sae_filtered": "#8c564b", "sae_input": "#17becf",
    "sae_random": "#7f7f7f", "diffmean": "#2ca02c", "lora": "#9467bd", "prompt": "#ff7f0e", "unsteered": "#000000",
}
RATIO_NAMES = {"sae_filtered": "output-filtered features", "sae_output": "the output-score pick"}
#: The verb's form for each subject (plural "features", singular "pick").
_STEER = {"sae_filtered": "steer", "sae_output": "steers"}


def ratio_sentence(r: Ratio) -> str:
    """One plain-text sentence on one of the paper's ratios (numbers only, from the data)."""
    what = RATIO_NAMES.get(r.method, r.method)
    if r.n == 0:
        return f"No concept has results for both {what} and the activation pick, so their ratio cannot be computed."
    if not math.isfinite(r.ratio):
        if r.ratio == math.inf:
            return (f"On {r.n} concept(s) the activation pick never scored (mean combined 0) and {what} scored {r.mean:.3f}: "
                    f"{what} did better here, but the ratio and its standard error are undefined.")
        return f"On {r.n} concept(s) neither {what} nor the activation pick ever scored (mean combined 0): no ratio, no verdict."
    se = f" ± {r.se:.2f}" if math.isfinite(r.se) else " (no standard error with one concept)"
    head = (f"Mean combined score of {what} ÷ that of the activation pick: {r.ratio:.2f}{se} "
            f"({r.mean:.3f} vs {r.mean_baseline:.3f}, {r.n} concept{'s' if r.n != 1 else ''}).")
    if not math.isfinite(r.se):
        verdict = "Too few concepts to say whether the difference is real."
    elif r.ratio - Z95 * r.se > 1:
        verdict = f"{what[0].upper() + what[1:]} {_STEER.get(r.method, 'steer')} better than activation picks on this run (95% interval above 1)."
    elif r.ratio + Z95 * r.se < 1:
        verdict = f"{what[0].upper() + what[1:]} {_STEER.get(r.method, 'steer')} worse than activation picks on this run (95% interval below 1)."
    else:
        verdict = "Not established on this run: the 95% interval of the ratio includes 1."
    return f"{head} {verdict}"


def concept_headline(results: EvalResults) -> str:
    """Whether "output-filtered features steer better than activation picks" holds on this run, and the
    output-score pick's ratio beside it; plain text computed from the data (the paper reports 2-3x)."""
    ratios = results.ratios()
    counts = results.candidate_counts()
    parts = [ratio_sentence(ratios["sae_filtered"]), ratio_sentence(ratios["sae_output"])]
    if counts:
        parts.append(candidate_sentence(counts))
    return " ".join(parts)


def candidate_sentence(counts: dict[str, int]) -> str:
    return (f"Of {counts['concepts']} concept{'s' if counts['concepts'] != 1 else ''}, {counts['input_side']} have input-side candidates, {counts['output_side']} "
            f"output-side ones, {counts['both']} both, {counts['filtered']} an input-side candidate with output score >= tau, "
            f"and {counts['none']} none.")


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
    pivot = pivot[[m for m in KNOWN_METHODS if m in pivot.columns]]
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
        part = part.set_index("method").reindex([m for m in KNOWN_METHODS if m in set(part["method"])])
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
        "strength_sae": fig_strength_curves(strength_curves(gens, KNOWN_SAE_METHODS)),
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
    if not results.previous_protocol:
        pd.DataFrame([vars(r) for r in results.ratios().values()]).to_csv(out / "ratios.csv", index=False)
    figs = figures(results)
    (out / "figures").mkdir(exist_ok=True)
    parts = []
    for i, (name, fig) in enumerate(figs.items()):
        (out / "figures" / f"{name}.json").write_text(fig.to_json())
        # plotly.js is inlined once so that the report opens offline.
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    head = f"<h1>Steering evaluation: {html.escape(str(results.meta.get('sae_id')))} ({html.escape(str(results.meta.get('model')))})</h1>"
    if not results.previous_protocol:
        head += f"<p>{html.escape(concept_headline(results))}</p>"
    (out / "report.html").write_text("<html><head><meta charset='utf-8'></head><body>" + head + table.to_html(index=False, float_format="%.3f") + "".join(parts) + "</body></html>")


# ---------------------------------------------------------------------------------------------------
# Feature level


def fig_threshold_curve(summary: dict):
    """The paper's threshold curve: mean success@20 of features at or above each output-score threshold (and
    below it), with the input-score curve beside it."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("by output score", "by input score"))
    for col, key in ((1, "thresholds_output"), (2, "thresholds_input")):
        t = summary.get(key)
        if t is None or t.empty:
            continue
        for side, color in (("above", "#d62728"), ("below", "#1f77b4")):
            fig.add_trace(go.Scatter(
                x=t["threshold"], y=t[f"mean_{side}"], mode="lines+markers", name=f"score >= t" if side == "above" else "score < t",
                legendgroup=side, showlegend=col == 1, line_color=color,
                error_y=dict(type="data", array=t[f"sem_{side}"].fillna(0)),
                customdata=t[f"n_{side}"], hovertemplate="t=%{x:.0e}: %{y:.2f} (n=%{customdata})<extra></extra>"), row=1, col=col)
    fig.update_xaxes(type="log", title_text="threshold t")
    fig.update_yaxes(title_text="mean success@20 at the best amp", row=1, col=1)
    fig.update_layout(height=360, margin=dict(l=50, r=20, t=40, b=40))
    return fig


def fig_success_scatter(table: pd.DataFrame, k: int = 20):
    """Success@k at the best amp against output score (log axis), coloured by input score."""
    import plotly.graph_objects as go

    t = table.copy()
    x = t["output_score"].clip(lower=1e-12)
    fig = go.Figure(go.Scatter(
        x=x, y=t[f"success_{k}"], mode="markers",
        marker=dict(color=t["input_score"].fillna(-0.1), colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="input score"), size=8),
        customdata=np.stack([t["feature"], t["best_amp"], t["input_score"].fillna(np.nan)], axis=1),
        hovertemplate="feature %{customdata[0]} · best amp %{customdata[1]}<br>output %{x:.2e} · input %{customdata[2]:.2f}"
                      "<br>success@" + str(k) + " %{y:.2f}<extra></extra>"))
    fig.update_xaxes(type="log", title_text="output score")
    fig.update_yaxes(title_text=f"success@{k} at the best amp")
    fig.update_layout(height=380, margin=dict(l=50, r=20, t=30, b=40))
    return fig


def fig_best_amp(tables: dict[str, pd.DataFrame]):
    """Histogram of the best amp, one bar group per run (layer)."""
    import plotly.graph_objects as go

    from ..text import escape

    fig = go.Figure()
    amps = sorted({float(a) for t in tables.values() for a in t["best_amp"]})
    for name, t in tables.items():
        counts = t["best_amp"].value_counts()
        fig.add_trace(go.Bar(x=[f"{a:g}" for a in amps], y=[int(counts.get(a, 0)) for a in amps], name=escape(name, whitespace=True)))
    fig.update_layout(barmode="group", height=320, xaxis_title="best amp", yaxis_title="features",
                      margin=dict(l=50, r=20, t=30, b=40))
    return fig
