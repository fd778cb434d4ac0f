"""Pure shaping of evaluation results for the Evaluation page (no Streamlit): method labels, the headline
sentence, per-concept feature picks, the generations view, and the CLI commands the page suggests.

Everything here reads what ``saesteer.evaluation`` wrote; concept names and generated texts are untrusted
text and only ever leave this module inside DataFrames (shown as plain text) or shell-quoted commands.
"""

from __future__ import annotations

import html
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import EMBEDDED_MODEL, ConfigError
from ..evaluation import KNOWN_METHODS, PREVIOUS_SAE_METHODS, EvalParams, EvalResults

METHOD_LABELS = {
    "sae_activation": "SAE feature · activation pick",
    "sae_output": "SAE feature · output-score pick",
    "sae_filtered": "SAE features · output-filtered (mean)",
    "sae_random": "SAE feature · random candidate",
    "diffmean": "DiffMean",
    "lora": "LoRA",
    "prompt": "prompting",
    "unsteered": "unsteered",
}
#: Labels of the previous protocol's SAE methods (candidates from the logit lens only).
PREVIOUS_LABELS = {
    "sae_output": "SAE feature · output score",
    "sae_input": "SAE feature · input score",
    "sae_random": "SAE feature · random candidate",
}
PICK_PREFIX = {"sae_output": "output pick", "sae_input": "input pick", "sae_random": "random pick"}
#: The per-concept candidate table of this protocol: unit method -> column prefix.
NEW_PICKS = {"sae_activation": "activation pick", "sae_output": "output pick", "sae_random": "random pick"}
TABLE_COLUMNS = ("concept_score", "success_k", "fluency", "ppl", "repetition", "combined", "judge_score")
#: Fluency gap within which two methods count as "comparable" in the headline's verdict.
FLUENCY_SLACK = 0.1


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>$<])")


def md_text(text: object) -> str:
    """Untrusted text (a concept, an SAE id, an error message) for Markdown: HTML-escaped, Markdown syntax neutralised."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=True).replace("\n", " "))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def label(method: str, previous: bool = False) -> str:
    """The readable name of ``method`` (``previous``: as the previous protocol named it)."""
    return (PREVIOUS_LABELS if previous else METHOD_LABELS).get(method, METHOD_LABELS.get(method, method))


def method_display(table: pd.DataFrame, previous: bool = False) -> pd.DataFrame:
    """The method table for display: readable method names first, the key metrics with their standard errors."""
    if table.empty:
        return pd.DataFrame(columns=["method", "n_concepts"])
    cols = ["n_concepts"]
    for metric in TABLE_COLUMNS:
        if metric in table.columns:
            cols.append(metric)
            if metric in ("concept_score", "fluency", "combined") and f"{metric}_sem" in table.columns:
                cols.append(f"{metric}_sem")
    out = table[cols].copy()
    out.insert(0, "method", [label(m, previous) for m in table["method"]])
    return out.reset_index(drop=True)


def _pct(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else "n/a"


def _num(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "n/a"


def previous_headline(table: pd.DataFrame) -> str:
    """For a run of the previous protocol: one short paragraph (Markdown, numbers only) comparing output- with
    input-score selection among logit-lens candidates, from the data."""
    if table.empty or not {"sae_output", "sae_input"} <= set(table["method"]):
        return "This run has no output-score and input-score selection to compare (see the table for the methods it has)."
    t = table.set_index("method")
    o, i = t.loc["sae_output"], t.loc["sae_input"]
    a, b = float(o["concept_score"]), float(i["concept_score"])
    fa, fb = float(o["fluency"]), float(i["fluency"])
    n = int(o["n_concepts"])
    if b > 0:
        ratio = a / b
        versus = f"**{ratio:.1f}×** that of input-score selection ({_pct(b)})"
    elif a > 0:
        ratio = math.inf
        versus = "where input-score selection never reached the concept (0%)"
    else:
        ratio = math.nan
        versus = "as for input-score selection: neither reached the concept"
    text = (
        f"**Output-score selection:** concept success {_pct(a)} of held-out generations — {versus} — "
        f"at fluency {_num(fa)} vs {_num(fb)} (combined {_num(float(o['combined']))} vs {_num(float(i['combined']))}; "
        f"{plural(n, 'concept')})."
    )
    if a > 0 and ratio >= 2 and fa >= fb - FLUENCY_SLACK:
        verdict = "The paper's claim — at least 2× the concept success at comparable fluency — **holds** on this run."
    elif a > 0 and ratio >= 2:
        verdict = "Concept success is at least 2×, but at **lower fluency**: here the gain costs fluency."
    else:
        verdict = "The paper's claim — at least 2× the concept success at comparable fluency — **does not hold** on this run."
    refs = [f"{label(m)} {_pct(float(t.loc[m, 'concept_score']))} · {_num(float(t.loc[m, 'fluency']))}"
            for m in ("sae_random", "diffmean", "lora", "prompt", "unsteered") if m in t.index]
    parts = [text, verdict]
    if refs:
        parts.append("For reference (concept success · fluency): " + "; ".join(refs) + ".")
    if n < 10:
        parts.append(f"With only {plural(n, 'concept')}, read these means with their standard errors (± in the table).")
    return " ".join(parts)


def _pick_cells(prefix: str, unit: pd.Series, top_tokens: Mapping[int, str] | None, values: Sequence[tuple[str, str]]) -> dict:
    """One pick's cells of a per-concept table: its feature, its top tokens when known, and ``values``
    ((column, unit-record key) pairs)."""
    feature = int(unit["feature"])
    cells: dict = {f"{prefix}: feature": feature}
    if top_tokens is not None:
        cells[f"{prefix}: top tokens"] = top_tokens.get(feature, "")
    for column, key in values:
        cells[f"{prefix}: {column}"] = float(unit.get(key, math.nan))
    return cells


def candidate_table(results: EvalResults, top_tokens: Mapping[int, str] | None = None) -> pd.DataFrame:
    """A run of this protocol, one row per concept considered: how many candidates of each kind it has, and per
    pick (activation, output-score, random) the feature, its firing share and output score, the strength chosen
    on the train half and the combined score on the test half; the output-filtered set's size and mean combined
    score; and why a method was skipped. ``top_tokens`` (feature -> tokens) adds a column per pick."""
    units = results.units
    if units.empty or "n_input_side" not in units.columns:
        return pd.DataFrame(columns=["concept"])
    summary = results.summary()
    scored = dict(zip(zip(summary["concept"], summary["method"]), summary["combined"])) if len(summary) else {}
    rows = []
    for concept, part in units.groupby("concept", sort=False):
        first = part.iloc[0]
        row: dict = {"concept": concept, **{f"{k.replace('_', '-')}": int(first.get(f"n_{k}", 0) or 0)
                                            for k in ("input_side", "output_side", "both", "filtered")}}
        by_method = part.set_index("method")
        for m, p in NEW_PICKS.items():
            u = by_method.loc[m] if m in by_method.index else None
            if u is None or u["status"] != "done":
                row[f"{p}: feature"] = None
                continue
            row |= _pick_cells(p, u, top_tokens, (("firing share", "firing_share"), ("output score", "output_score"), ("strength", "best_strength")))
            row[f"{p}: combined"] = float(scored.get((concept, m), math.nan))
        if "sae_filtered" in by_method.index and by_method.loc["sae_filtered", "status"] == "done":
            row["filtered: combined (mean)"] = float(scored.get((concept, "sae_filtered"), math.nan))
        reasons = part[part["status"] == "skipped"]
        if len(reasons) and "reason" in reasons.columns:
            row["skipped"] = "; ".join(dict.fromkeys(f"{r['method'] if len(reasons) < len(part) else 'all'}: {r['reason']}"
                                                     for _, r in reasons.iterrows()))
        rows.append(row)
    return pd.DataFrame(rows)


def filtered_features(results: EvalResults) -> pd.DataFrame:
    """The per-feature rows of ``sae_filtered``: each output-filtered feature of each concept, its scores, the
    strength chosen for it on the train half and its test-half metrics."""
    from ..evaluation import feature_results

    per = feature_results(results.generations)
    per = per[per["method"] == "sae_filtered"] if len(per) else per
    if per.empty:
        return pd.DataFrame(columns=["concept", "feature"])
    scores = {}
    units = results.units
    for _, u in units[(units["method"] == "sae_filtered") & (units["status"] == "done")].iterrows():
        for f, o, s in zip(u.get("features") or [], u.get("feature_output_scores") or [], u.get("feature_firing_shares") or []):
            scores[(u["concept"], int(f))] = (float(o), float(s))
    out = per.drop(columns=["method"]).reset_index(drop=True)
    out.insert(2, "output_score", [scores.get((c, int(f)), (math.nan, math.nan))[0] for c, f in zip(out["concept"], out["feature"])])
    out.insert(3, "firing_share", [scores.get((c, int(f)), (math.nan, math.nan))[1] for c, f in zip(out["concept"], out["feature"])])
    return out


def concept_picks(results: EvalResults, top_tokens: Mapping[int, str] | None = None) -> pd.DataFrame:
    """A run of the previous protocol, one row per evaluated concept: its number of candidate features and, per SAE selection rule, the
    feature picked, its output and input scores, the strength chosen on the train half and the concept
    score / combined score it reached on the test half. ``top_tokens`` (feature -> tokens) adds a column."""
    units = results.units
    if units.empty or "feature" not in units.columns:
        return pd.DataFrame(columns=["concept", "candidates"])
    done = units[(units["status"] == "done") & units["method"].isin(PREVIOUS_SAE_METHODS)]
    summary = results.summary()
    scored = ({(c, m): (cs, cb) for c, m, cs, cb in zip(summary["concept"], summary["method"], summary["concept_score"], summary["combined"])}
              if len(summary) else {})
    rows = []
    for concept, part in done.groupby("concept", sort=False):
        row: dict = {"concept": concept, "candidates": int(part["n_candidates"].max()) if "n_candidates" in part else None}
        by_method = part.set_index("method")
        for m in PREVIOUS_SAE_METHODS:
            p = PICK_PREFIX[m]
            if m not in by_method.index:
                continue
            row |= _pick_cells(p, by_method.loc[m], top_tokens, (("output score", "output_score"), ("input score", "input_score"), ("strength", "best_strength")))
            if (concept, m) in scored:
                row[f"{p}: concept score"], row[f"{p}: combined"] = (float(v) for v in scored[(concept, m)])
        if "sae_output" in by_method.index and "sae_input" in by_method.index:
            row["same feature"] = bool(int(by_method.loc["sae_output", "feature"]) == int(by_method.loc["sae_input", "feature"]))
        rows.append(row)
    return pd.DataFrame(rows)


def concept_results(results: EvalResults) -> pd.DataFrame:
    """Per (concept, method) on the test half, methods in the page's order and with readable names."""
    summary = results.summary()
    if summary.empty:
        return summary
    order = {m: i for i, m in enumerate(KNOWN_METHODS)}
    out = summary.sort_values(["concept", "method"], key=lambda s: s.map(order) if s.name == "method" else s, kind="stable")
    out = out.assign(method=[label(m, results.previous_protocol) for m in out["method"]])
    return out.reset_index(drop=True)


def skipped_concepts(results: EvalResults) -> pd.DataFrame:
    """Concepts every method skipped, with the reason."""
    units = results.units
    if units.empty:
        return pd.DataFrame(columns=["concept", "reason"])
    all_skipped = units.groupby("concept", sort=False)["status"].apply(lambda s: (s == "skipped").all())
    names = [c for c, yes in all_skipped.items() if yes]
    part = units[units["concept"].isin(names)].drop_duplicates("concept")
    reasons = part["reason"] if "reason" in part.columns else pd.Series("", index=part.index)
    return pd.DataFrame({"concept": part["concept"].tolist(), "reason": reasons.fillna("").tolist()})


GENERATION_COLUMNS = ("concept", "method", "feature", "strength", "split", "prefix", "text", "mentions", "success_k", "ppl", "fluency", "combined")


def generations_view(gens: pd.DataFrame, concepts: Sequence[str] = (), methods: Sequence[str] = (), split: str = "test",
                     previous: bool = False) -> pd.DataFrame:
    """Generations filtered by concept, method and split ("test", "train" or "both"), readable method names."""
    out = gens
    if concepts:
        out = out[out["concept"].isin(list(concepts))]
    if methods:
        out = out[out["method"].isin(list(methods))]
    if split != "both":
        out = out[out["split"] == split]
    order = {m: i for i, m in enumerate(KNOWN_METHODS)}
    out = out.assign(_order=out["method"].map(order)).sort_values(["concept", "_order", "feature", "strength", "prefix_idx"], kind="stable")
    cols = [c for c in GENERATION_COLUMNS if c in out.columns]
    out = out[cols].assign(method=[label(m, previous) for m in out["method"]])
    return out.reset_index(drop=True)


def concepts_timed(timings: pd.DataFrame) -> int:
    """Concepts covered by a run's timing records: one per record, or the ``concepts`` list of a record that
    timed a group of concepts batched together."""
    if "concepts" not in timings.columns:
        return len(timings)
    return int(sum(len(c) if isinstance(c, (list, tuple, np.ndarray)) else 1 for c in timings["concepts"]))


def tokens_per_second(timings: pd.DataFrame) -> float:
    """Decoded tokens per second over the whole run (batched steered generation)."""
    if timings.empty or not {"row_steps", "gen_seconds"} <= set(timings.columns):
        return math.nan
    secs = float(timings["gen_seconds"].sum())
    return float(timings["row_steps"].sum()) / secs if secs > 0 else math.nan


# ---------------------------------------------------------------------------------------------------
# Commands


def resume_command(meta: Mapping, out: str | Path) -> tuple[str, list[str]]:
    """The ``eval ... --resume`` command that continues the run in ``out`` (a run of this protocol), and notes
    on what it cannot restore by itself (settings the CLI does not take, or concept/prefix files to give
    again). The run's settings become flags through the CLI's own entries (``cli.evaluate.FLAGS``)."""
    from ..cli.evaluate import DEFAULT_N_CONCEPTS, FLAGS
    from ..cli.flags import command_line

    args = ["python", "-m", "saesteer", "eval"]
    notes: list[str] = []
    model = str(meta.get("model") or EMBEDDED_MODEL)
    if model != EMBEDDED_MODEL:
        args += ["--model", model]
    source = str(meta.get("feature_scores") or "")
    if source.startswith("bundled:") and meta.get("layer") is not None:
        args += ["--layer", str(meta["layer"])]
    else:
        args += ["--sae", str(meta.get("sae_id"))]
        if source:
            args += ["--features", source]
        notes.append("give `--sae` as the original run did (a directory, RELEASE:ID or bundled id)")
    goal = meta.get("run") or {}
    key = dict(meta.get("params") or {})
    if goal.get("methods"):
        key["methods"] = list(goal["methods"])
    names = {f.name for f in fields(EvalParams)}
    try:
        params = EvalParams.from_key({k: v for k, v in key.items() if k in names})
    except (ConfigError, TypeError) as exc:
        notes.append(f"this run's settings are not valid for this version ({exc}): the command uses the defaults")
        params = EvalParams()
    default = EvalParams()
    flagged = {f.field for f in FLAGS}
    other = sorted(k for k in names if k not in flagged and getattr(params, k) != getattr(default, k))
    if other:
        notes.append(f"this run changed settings the CLI does not take ({', '.join(other)}): continue it through `saesteer.evaluation.run_evaluation`")
    args += command_line(params, FLAGS)
    if goal.get("concepts") is not None:
        from ..evaluation import default_concepts

        if list(goal["concepts"]) != default_concepts():
            args += ["--concepts", "CONCEPTS.txt"]
            notes.append("CONCEPTS.txt: the run's concept list, one per line (Run details lists it)")
    if goal.get("n_concepts") not in (None, DEFAULT_N_CONCEPTS):
        args += ["--n-concepts", str(goal["n_concepts"])]
    prefixes = meta.get("prefixes")
    if prefixes is not None:
        from ..evaluation import default_prefixes

        if list(prefixes) != default_prefixes()[: len(prefixes)]:
            args += ["--prefixes", "PREFIXES.txt"]
            notes.append("PREFIXES.txt: the run's prefixes, one per line (Run details lists them)")
    if meta.get("judge"):
        args.append("--judge")
    args += ["--out", str(out), "--resume"]
    return " ".join(shlex.quote(a) for a in args), notes


def new_run_command(model_name: str, sae_source: str | None, sae_ref: str | None, layer: int | None,
                    features_dir: str | Path | None = None, n_concepts: int = 30) -> str:
    """The ``eval`` command for the SAE selected in the sidebar (a bundled one by layer, others by ``--sae``)."""
    args = ["python", "-m", "saesteer", "eval"]
    if model_name != EMBEDDED_MODEL:
        args += ["--model", model_name]
    if sae_source in (None, "bundled") or not sae_ref:
        args += ["--layer", str(layer if layer is not None and layer >= 0 else 8)]
    else:
        args += ["--sae", sae_ref]
        if features_dir is not None:
            args += ["--features", str(features_dir)]
    args += ["--n-concepts", str(n_concepts)]
    return " ".join(shlex.quote(a) for a in args)
