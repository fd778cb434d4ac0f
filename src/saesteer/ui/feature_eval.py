"""The Evaluation page's feature-level section and the concept-candidate table (the paper's two experiments)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from .. import paths
from ..evaluation import layout
from ..evaluation.feature_level import FeatureRun, feature_summary, headline, load_feature_run
from ..evaluation.report import fig_best_amp, fig_success_scatter, fig_threshold_curve
from ..plots import esc


@st.cache_data(show_spinner="Reading the feature-level runs…", max_entries=16)
def _load(path: str, stamp: float) -> FeatureRun:
    return load_feature_run(path)


def _stamp(path: Path) -> float:
    files = [path / "meta.json", *(path / "units").glob("*.json")] if (path / "units").is_dir() else [path / "meta.json"]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def _name(path: Path, meta: dict) -> str:
    where = "shipped" if path.resolve().is_relative_to(paths.EVAL_RESULTS.resolve()) else "cache"
    return f"{meta.get('sae_id', path.parent.name)} ({where})"


def render_feature_level() -> None:
    """Every feature-level run found: headline, threshold curve, scatter, best-amp histogram, tables."""
    st.subheader("Feature level: do features with a high output score steer towards their own tokens?")
    runs = layout.feature_runs()
    if not runs:
        st.info("No feature-level run yet: run `python -m saesteer eval features --layer L` (see `--help`).")
        return
    loaded: dict[str, FeatureRun] = {}
    for p in runs:
        try:
            loaded[_name(p, layout.read_meta(p))] = _load(str(p), _stamp(p))
        except Exception as exc:  # a damaged run must not take the page down
            st.warning(f"{esc(str(p))} could not be read: {esc(type(exc).__name__)}: {esc(str(exc))}")
    if not loaded:
        return
    choice = st.selectbox("Run", list(loaded), key="ev_fl_run")
    run = loaded[choice]
    summary = feature_summary(run.features)
    p = run.meta.get("params", {})
    done, planned = len(run.features), run.n_planned
    st.markdown(f"**{esc(headline(summary))}**")
    st.caption(f"{done} of {planned} features finished{'' if run.finished else ' (partial: resume with `--resume`)'}; "
               f"{p.get('n_prefixes')} prefixes, amps {p.get('amps')}, temperature {p.get('temperature')}, "
               f"{p.get('max_new_tokens')} new tokens, stop at {p.get('stop')!r}; best amp by {p.get('select')}.")
    if done < 3 or "thresholds_output" not in summary:
        if done >= 3:
            st.warning("This run has no feature scores next to it (feature_scores.csv): its statistics cannot be shown.")
        return
    st.dataframe(pd.DataFrame({
        "score": ["output score", "input score"],
        **{f"Spearman ρ vs success@{k}": [summary.get(f"rho_output_score_success_{k}"), summary.get(f"rho_input_score_success_{k}")]
           for k in (1, 5, 20)},
    }), hide_index=True, key="ev_fl_rho")
    st.plotly_chart(fig_threshold_curve(summary), key="ev_fl_curve")
    st.plotly_chart(fig_success_scatter(run.features), key="ev_fl_scatter")
    st.plotly_chart(fig_best_amp({k: v.features for k, v in loaded.items() if len(v.features)}), key="ev_fl_amp")
    t1, t2, t3 = st.tabs(["Threshold table", "Input × output scores", "Features"])
    with t1:
        st.dataframe(summary["thresholds_output"], hide_index=True, key="ev_fl_thr")
    with t2:
        st.dataframe(summary["joint"], key="ev_fl_joint")
        st.caption(f"Features with input score ≥ 0.5 and output score ≥ 0.1: {summary['n_high_both']} of {done}.")
    with t3:
        st.dataframe(run.features, hide_index=True, key="ev_fl_table")
