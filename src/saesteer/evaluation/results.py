"""Reading concept-level runs back: results, progress, per-concept and per-method tables, the paper's ratio,
candidate counts, packing."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import ConfigError
from . import layout
from .layout import PACKED_UNITS
from .metrics import METRICS
from .params import KNOWN_METHODS, KNOWN_SAE_METHODS, METHODS, PREVIOUS_METHODS, PROTOCOL


@dataclass
class EvalResults:
    """An evaluation run read back from disk (finished or partial)."""

    generations: pd.DataFrame  # one row per generation (see the module docstring for the columns)
    units: pd.DataFrame  # one row per (concept, method): status, reason, feature, best_strength, ...
    meta: dict
    timings: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Per (concept, method) on the test half, with the unit's number of candidate features."""
        out = summarize(self.generations)
        if len(self.units) and "n_candidates" in self.units.columns:
            out = out.merge(self.units[["concept", "method", "n_candidates"]], on=["concept", "method"], how="left")
        return out

    def methods(self, min_candidates: int = 1, common: bool = True) -> pd.DataFrame:
        return method_table(self.summary(), min_candidates, common)

    @property
    def previous_protocol(self) -> bool:
        """A run of the previous protocol (logit-lens candidates; methods sae_output, sae_input, sae_random)."""
        return self.meta.get("protocol") != PROTOCOL

    def ratios(self, metric: str = "combined") -> dict[str, Ratio]:
        """The paper's ratios: ``sae_filtered`` and ``sae_output`` over ``sae_activation`` (see :func:`paired_ratio`)."""
        summary = self.summary()
        return {m: paired_ratio(summary, m, "sae_activation", metric) for m in ("sae_filtered", "sae_output")}

    def candidate_counts(self) -> dict[str, int]:
        return candidate_counts(self.units)


def load_results(out: str | Path) -> EvalResults:
    """Read an evaluation directory written by :func:`run_evaluation` (also while it is still running)."""
    meta = layout.read_meta(out)
    recs, frames = layout.read_units(out)
    gens = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["concept", "method", "feature", "strength", "split", "prefix_idx", "text", *METRICS])
    units = pd.DataFrame(recs) if recs else pd.DataFrame(columns=["concept", "method", "status", "reason"])
    return EvalResults(gens, units, meta, layout.read_timings(out))


def pack_results(src: str | Path, dest: str | Path) -> Path:
    """Copy the finished run in ``src`` to ``dest`` in packed form: meta.json, the unit records as one
    ``units.parquet``, generations.parquet, timings.jsonl and the CSV tables (no per-unit files, no HTML
    report with inlined plotly). :func:`load_results` reads it like the original; it cannot be resumed."""
    src, dest = Path(src), Path(dest)
    results = load_results(src)
    if not len(results.units):
        raise ConfigError(f"{src} holds no finished units to pack")
    dest.mkdir(parents=True, exist_ok=True)
    meta = {**results.meta, "packed_from": str(src)}
    layout.write_json(dest / "meta.json", meta)
    units = results.units.copy()
    for col in units.columns:  # parquet needs one type per column: lists and scalars mixed with None are fine
        if units[col].map(lambda v: isinstance(v, (dict, tuple))).any():
            units[col] = units[col].map(lambda v: json.dumps(v, default=layout.json_default) if isinstance(v, (dict, tuple)) else v)
    layout.write_parquet(dest / PACKED_UNITS, units)
    layout.write_parquet(dest / "generations.parquet", results.generations)
    if (src / "timings.jsonl").exists():
        (dest / "timings.jsonl").write_text((src / "timings.jsonl").read_text())
    summary = results.summary()
    summary.to_csv(dest / "summary.csv", index=False)
    method_table(summary).to_csv(dest / "methods.csv", index=False)
    results.units.to_csv(dest / "units.csv", index=False)
    return dest


@dataclass(frozen=True)
class RunProgress:
    """How far an evaluation directory got (see :func:`run_progress`)."""

    finished: bool
    """The run ended normally (an interrupted or still running one has not)."""
    n_done: int
    """Concepts with a result for every method of the run."""
    n_partial: int
    """Concepts with results for some methods only (the run stopped inside them)."""
    n_skipped: int
    """Concepts every method skipped (no candidate features)."""
    target: int | None
    """Concepts with candidates the run was asked for (``--n-concepts``); None when the run did not record it."""
    methods: tuple[str, ...]


def run_progress(results: EvalResults, out: str | Path) -> RunProgress:
    """Progress of the run in ``out``. Runs record their goal and a ``finished`` stamp in meta.json; for
    runs written before that, the report files (written after the last concept) mark a finished run."""
    meta = results.meta
    goal = meta.get("run") or {}
    fallback = METHODS if meta.get("protocol") == PROTOCOL else PREVIOUS_METHODS
    methods = tuple(goal.get("methods") or (meta.get("params") or {}).get("methods") or fallback)
    n_done = n_partial = n_skipped = 0
    units = results.units
    if len(units):
        for _, part in units.groupby("concept", sort=False):
            status = set(part["status"])
            if status == {"skipped"}:
                n_skipped += 1
            elif set(methods) <= set(part["method"]):
                n_done += 1
            else:
                n_partial += 1
    stamped = meta.get("finished") is not None if "run" in meta else (Path(out) / "methods.csv").exists()
    return RunProgress(stamped and n_partial == 0, n_done, n_partial, n_skipped, goal.get("n_concepts"), methods)


def summarize(generations: pd.DataFrame) -> pd.DataFrame:
    """Per (concept, method): means over the test-half generations at the chosen strength (ppl: median). A
    method that steers with several features (``sae_filtered``) is first summarised per feature, then averaged
    over its features (each feature has the same test prefixes, so this is also the mean over its rows); its
    ``feature`` is then -1 and ``strength`` NaN, and ``n_features`` says how many."""
    per = feature_results(generations)
    if per.empty:
        return pd.DataFrame(columns=["concept", "method", "feature", "strength", "n", "n_features", *METRICS])
    metrics = [m for m in (*METRICS, "judge_score") if m in per.columns]
    g = per.groupby(["concept", "method"], sort=False)
    out = g[metrics].mean()
    out.insert(0, "n_features", g.size())
    out.insert(0, "n", g["n"].sum())
    single = out["n_features"] == 1
    out.insert(0, "strength", g["strength"].first().where(single))
    out.insert(0, "feature", g["feature"].first().where(single, -1).astype(int))
    return out.reset_index()


def feature_results(generations: pd.DataFrame) -> pd.DataFrame:
    """Per (concept, method, feature): means over the test-half generations at the feature's chosen strength
    (ppl: median). The per-feature rows of ``sae_filtered``; one row per (concept, method) elsewhere."""
    test = generations[generations["split"] == "test"] if len(generations) else generations
    if test.empty:
        return pd.DataFrame(columns=["concept", "method", "feature", "strength", "n", *METRICS])
    metrics = [m for m in (*METRICS, "judge_score") if m in test.columns]
    agg = {m: ("median" if m == "ppl" else "mean") for m in metrics}
    g = test.groupby(["concept", "method", "feature"], sort=False)
    out = g.agg(agg)
    out.insert(0, "n", g.size())
    out.insert(0, "strength", g["strength"].first())
    return out.reset_index()


@dataclass(frozen=True)
class Ratio:
    """The paper's ratio of one method's mean score to another's over the concepts that have both."""

    method: str
    baseline: str
    n: int
    """Concepts with a result for both methods."""
    mean: float
    """Mean of ``method``'s score over those concepts."""
    mean_baseline: float
    ratio: float
    """mean / mean_baseline (inf when only the baseline is 0, NaN when both are)."""
    se: float
    """Standard error of the ratio, paired over concepts (delta method; NaN below 2 concepts or at a zero baseline)."""


def paired_ratio(summary: pd.DataFrame, method: str, baseline: str, metric: str = "combined") -> Ratio:
    """Ratio of means R = mean(y) / mean(x) over the concepts with both ``method`` (y) and ``baseline`` (x),
    and its standard error by the delta method for paired samples:
    SE(R) = sqrt(sum_i (y_i - R x_i)^2 / (n (n - 1))) / mean(x), which is
    R · sqrt((s_y^2 / ybar^2 + s_x^2 / xbar^2 - 2 s_xy / (xbar ybar)) / n) with sample (co)variances."""
    nan = math.nan
    if summary.empty or metric not in summary.columns:
        return Ratio(method, baseline, 0, nan, nan, nan, nan)
    pivot = summary[summary["method"].isin([method, baseline])].pivot_table(index="concept", columns="method", values=metric, aggfunc="first")
    if method not in pivot.columns or baseline not in pivot.columns:
        return Ratio(method, baseline, 0, nan, nan, nan, nan)
    both = pivot[[method, baseline]].dropna()
    y, x = both[method].to_numpy(float), both[baseline].to_numpy(float)
    n = len(both)
    if n == 0:
        return Ratio(method, baseline, 0, nan, nan, nan, nan)
    ybar, xbar = float(y.mean()), float(x.mean())
    if xbar == 0:
        return Ratio(method, baseline, n, ybar, xbar, math.inf if ybar > 0 else nan, nan)
    r = ybar / xbar
    se = math.sqrt(float(((y - r * x) ** 2).sum()) / (n * (n - 1))) / xbar if n > 1 else nan
    return Ratio(method, baseline, n, ybar, xbar, r, se)


CANDIDATE_KINDS = ("input_side", "output_side", "both", "filtered", "none")


def candidate_counts(units: pd.DataFrame) -> dict[str, int]:
    """How many of a run's concepts have each kind of candidate: ``input_side`` (at least one feature fires on
    the concept), ``output_side`` (at least one promotes it), ``both`` (at least one of each), ``filtered`` (an
    input-side candidate with output score >= tau) and ``none``; plus ``concepts``, all concepts considered.
    Empty for runs that did not record candidate kinds (the previous protocol)."""
    if units.empty or "n_input_side" not in units.columns:
        return {}
    per = units.drop_duplicates("concept").set_index("concept")
    n_in, n_out = per["n_input_side"].fillna(0), per["n_output_side"].fillna(0)
    return {"concepts": len(per), "input_side": int((n_in > 0).sum()), "output_side": int((n_out > 0).sum()),
            "both": int(((n_in > 0) & (n_out > 0)).sum()), "filtered": int((per["n_filtered"].fillna(0) > 0).sum()),
            "none": int(((n_in == 0) & (n_out == 0)).sum())}


def method_table(summary: pd.DataFrame, min_candidates: int = 1, common: bool = True) -> pd.DataFrame:
    """Per method: mean and standard error over concepts of each metric, on the concepts that every listed
    method completed (so all methods are compared on the same concepts), or, ``common=False``, on the concepts
    each method completed (``n_concepts`` then differs). ``min_candidates`` > 1 keeps only concepts with at
    least that many candidate features: with one candidate, all SAE methods steer with the same feature."""
    if "n_candidates" in summary.columns and min_candidates > 1:
        keep = summary.groupby("concept")["n_candidates"].max()
        summary = summary[summary["concept"].isin(keep[keep >= min_candidates].index)]
    if summary.empty:
        return pd.DataFrame(columns=["method", "n_concepts"])
    methods = [m for m in KNOWN_METHODS if m in set(summary["method"])]
    per = summary.groupby("concept")["method"].apply(set)
    shared = [c for c, ms in per.items() if set(methods) <= ms] if common else list(per.index)
    rows = []
    for m in methods:
        part = summary[(summary["method"] == m) & summary["concept"].isin(shared)]
        row = {"method": m, "n_concepts": len(part)}
        for metric in [x for x in (*METRICS, "judge_score") if x in part.columns]:
            vals = part[metric].astype(float)
            row[metric] = vals.mean()
            row[f"{metric}_sem"] = vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def strength_curves(generations: pd.DataFrame, methods: Sequence[str] = KNOWN_SAE_METHODS) -> pd.DataFrame:
    """Train-half means per (method, strength) over all concepts: the curves strengths are chosen from."""
    train = generations[(generations["split"] == "train") & generations["method"].isin(methods)]
    if train.empty:
        return pd.DataFrame(columns=["method", "strength", "concept_score", "fluency", "combined"])
    return train.groupby(["method", "strength"])[["concept_score", "fluency", "combined", "success_k"]].mean().reset_index()
