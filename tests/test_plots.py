"""plots.py: pure figure builders. Checked on small hand-made tables (test data, not model output)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from saesteer import plots

XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]


def scores_table(n: int = 12, seed: int = 0) -> pd.DataFrame:
    """A synthetic scores table (random numbers standing in for real scores)."""
    rng = np.random.default_rng(seed)
    inp = rng.uniform(0, 1, n)
    inp[:2] = np.nan  # features with too few contexts
    return pd.DataFrame(
        {
            "feature": np.arange(n),
            "output_score": rng.uniform(0, 0.5, n),
            "input_score": inp,
            "density": rng.uniform(0, 0.1, n),
            "max_activation": rng.uniform(1, 10, n),
            "top_tokens": [" | ".join([XSS[i % 2], f" word{i}", "\n"]) for i in range(n)],
            "bottom_tokens": ["x | y"] * n,
        }
    )


def test_score_distributions_one_trace_per_layer_and_panel():
    frames = {5: scores_table(seed=1), 2: scores_table(seed=2)}
    fig = plots.score_distributions(frames, kind="box")
    assert len(fig.data) == 4
    names = [t.name for t in fig.data]
    assert names == ["L2", "L5", "L2", "L5"]  # sorted by layer within each panel
    # Input panel drops features without an input score; output panel keeps them all.
    np.testing.assert_allclose(np.asarray(fig.data[0].y), frames[2]["input_score"].dropna().to_numpy())
    np.testing.assert_allclose(np.asarray(fig.data[3].y), frames[5]["output_score"].to_numpy())
    assert isinstance(plots.score_distributions(frames, kind="violin").data[0], go.Violin)
    with pytest.raises(ValueError, match="box"):
        plots.score_distributions(frames, kind="pie")


def test_scatter_customdata_names_features_and_escapes_tokens():
    table = scores_table()
    fig = plots.score_scatter(table, input_threshold=0.5, output_threshold=0.1, highlight=5)
    pts = fig.data[0]
    kept = table.dropna(subset=["input_score"])
    assert [int(c[0]) for c in pts.customdata] == kept["feature"].tolist()
    np.testing.assert_allclose(np.asarray(pts.x, dtype=float), kept["input_score"].to_numpy())
    hover = " ".join(str(c[1]) for c in pts.customdata)
    assert "<script>" not in hover and "<img" not in hover
    assert "&lt;script&gt;" in hover and "&lt;img src=x onerror=alert(1)&gt;" in hover
    assert "\n" not in hover and "⏎" in hover
    assert len(fig.data) == 2  # the highlight ring
    shapes = fig.layout.shapes
    assert {s.x0 for s in shapes if s.x0 == s.x1} == {0.5} and {s.y0 for s in shapes if s.y0 == s.y1} == {0.1}


def test_scatter_of_empty_table():
    fig = plots.score_scatter(scores_table().iloc[0:0])
    assert len(fig.data[0].x) == 0


def test_histogram_bars_span_the_bins():
    edges = np.array([0.0, 0.5, 1.5, 4.0])
    counts = np.array([3, 0, 7])
    fig = plots.activation_histogram(edges, counts, title="<b>x</b>")
    bar = fig.data[0]
    np.testing.assert_allclose(bar.x, [0.25, 1.0, 2.75])
    np.testing.assert_allclose(bar.width, np.diff(edges))
    np.testing.assert_allclose(bar.y, counts)
    assert fig.layout.yaxis.type == "log"
    assert "<b>" not in fig.layout.title.text
    with pytest.raises(ValueError, match="len"):
        plots.activation_histogram(edges, counts[:2])


def test_logit_bars_largest_on_top_and_escaped():
    fig = plots.logit_bars(["a", XSS[0], "c"], [3.0, 2.0, 1.0])
    bar = fig.data[0]
    assert list(bar.x) == [1.0, 2.0, 3.0]  # plotly draws the first category at the bottom
    assert bar.y[-1] == "1. a"
    assert all("<script>" not in label for label in bar.y)


def test_threshold_share_bars_and_sweep_figure():
    shares = pd.DataFrame({"layer": [2, 5], "input_share": [0.5, 0.25], "output_share": [0.1, 0.2], "both_share": [0.05, 0.1]})
    fig = plots.threshold_share_bars(shares)
    assert [t.name for t in fig.data] == ["input score ≥ threshold", "output score ≥ threshold", "both"]
    assert list(fig.data[2].y) == [0.05, 0.1]

    sweep = pd.DataFrame({"strength": [0.0, 2.0, 8.0], "concept_hits": [0, 2, 5], "perplexity": [10.0, 12.0, 40.0]})
    fig = plots.sweep_figure(sweep)
    assert list(fig.data[0].y) == [0, 2, 5] and list(fig.data[1].y) == [10.0, 12.0, 40.0]
    assert fig.data[1].yaxis == "y2"
    assert fig.layout.xaxis.type == "linear"  # a zero strength rules out a log axis
