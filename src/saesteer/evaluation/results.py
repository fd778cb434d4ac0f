"""Reading concept-level runs back: results, progress, per-concept and per-method tables, packing."""

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
from .params import METHODS, SAE_METHODS


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

    def methods(self, min_candidates: int = 1) -> pd.DataFrame:
        return method_table(self.summary(), min_candidates)


def load_results(out: str | Path) -> EvalResults:
    """Read an evaluation directory written by :func:`run_evaluation` (also while it is still running)."""
    out = Path(out)
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{out} holds no evaluation (no meta.json): run `python -m saesteer eval` first")
    meta = json.loads(meta_path.read_text())
    if not (out / "units").is_dir() and (out / PACKED_UNITS).is_file():
        units = pd.read_parquet(out / PACKED_UNITS)
        gens = pd.read_parquet(out / "generations.parquet")
        tpath = out / "timings.jsonl"
        timings = pd.read_json(tpath, lines=True) if tpath.exists() and tpath.stat().st_size else pd.DataFrame()
        return EvalResults(gens, units, meta, timings)
    unit_rows, frames = [], []
    for j in sorted((out / "units").glob("*.json")):
        unit_rows.append(json.loads(j.read_text()))
        pq = j.with_suffix(".parquet")
        if pq.exists():
            frames.append(pd.read_parquet(pq))
    gens = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["concept", "method", "feature", "strength", "split", "prefix_idx", "text", *METRICS])
    units = pd.DataFrame(unit_rows) if unit_rows else pd.DataFrame(columns=["concept", "method", "status", "reason"])
    tpath = out / "timings.jsonl"
    timings = pd.read_json(tpath, lines=True) if tpath.exists() and tpath.stat().st_size else pd.DataFrame()
    return EvalResults(gens, units, meta, timings)


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
    methods = tuple(goal.get("methods") or (meta.get("params") or {}).get("methods") or METHODS)
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
    """Per (concept, method): means over the test-half generations at the chosen strength (ppl: median)."""
    test = generations[generations["split"] == "test"]
    if test.empty:
        return pd.DataFrame(columns=["concept", "method", "feature", "strength", "n", *METRICS])
    metrics = [m for m in (*METRICS, "judge_score") if m in test.columns]
    agg = {m: ("median" if m == "ppl" else "mean") for m in metrics}
    g = test.groupby(["concept", "method"], sort=False)
    out = g.agg(agg)
    out.insert(0, "n", g.size())
    out.insert(0, "strength", g["strength"].first())
    out.insert(0, "feature", g["feature"].first())
    return out.reset_index()


def method_table(summary: pd.DataFrame, min_candidates: int = 1) -> pd.DataFrame:
    """Per method: mean and standard error over concepts of each metric, on the concepts that every listed
    method completed (so all methods are compared on the same concepts). ``min_candidates`` > 1 keeps only
    concepts with at least that many candidate features: with one candidate, all SAE methods steer with
    the same feature."""
    if "n_candidates" in summary.columns and min_candidates > 1:
        keep = summary.groupby("concept")["n_candidates"].max()
        summary = summary[summary["concept"].isin(keep[keep >= min_candidates].index)]
    if summary.empty:
        return pd.DataFrame(columns=["method", "n_concepts"])
    methods = [m for m in METHODS if m in set(summary["method"])]
    per = summary.groupby("concept")["method"].apply(set)
    common = [c for c, ms in per.items() if set(methods) <= ms]
    rows = []
    for m in methods:
        part = summary[(summary["method"] == m) & summary["concept"].isin(common)]
        row = {"method": m, "n_concepts": len(part)}
        for metric in [x for x in (*METRICS, "judge_score") if x in part.columns]:
            vals = part[metric].astype(float)
            row[metric] = vals.mean()
            row[f"{metric}_sem"] = vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def strength_curves(generations: pd.DataFrame, methods: Sequence[str] = SAE_METHODS) -> pd.DataFrame:
    """Train-half means per (method, strength) over all concepts: the curves strengths are chosen from."""
    train = generations[(generations["split"] == "train") & generations["method"].isin(methods)]
    if train.empty:
        return pd.DataFrame(columns=["method", "strength", "concept_score", "fluency", "combined"])
    return train.groupby(["method", "strength"])[["concept_score", "fluency", "combined", "success_k"]].mean().reset_index()
