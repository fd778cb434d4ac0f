"""Evaluation: the paper's two experiments, read from the runs ``python -m saesteer eval`` writes. At the
concept level, SAE features found from the input side (activation pick, output-filtered features) and the
output side (output-score pick), and a random candidate, against DiffMean, LoRA, prompting and no steering;
runs of the previous protocol (logit-lens candidates only) are shown labelled as such.

The page never runs an evaluation itself (one layer takes an hour or more on a CPU); it lists the runs in
the cache and the results shipped under ``assets/eval/results/``, and tells the user the command to make
or continue one. Concepts and generated texts are untrusted: they are shown only in dataframes (plain
text) or escaped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitAPIException

from ... import evaluation as evaluate, paths
from ...text import escape
from .. import evaltables as et
from .. import loaders
from ..context import AppContext
from ..state import is_within

PROTOCOL = (
    "Per concept, SAE candidates come from the **input side** (features whose top contexts mostly peak on the "
    "concept: the offline stand-in for searching feature explanations) and from the **output side** (features whose "
    "logit-lens top-20 holds the concept). The **activation pick** is the input-side candidate that fires most "
    "reliably on the concept; the **output-score pick** has the highest output score over both sets; "
    "**output-filtered** steers with every input-side candidate whose output score is ≥ τ, each on its own, and "
    "reports their mean; a **random** candidate is the control. Each feature steers over the paper's strength grid on "
    "half of the neutral prefixes; the strength that scores best there is reported on the other half (the AxBench "
    "protocol), next to DiffMean, LoRA, prompting and no steering. *Concept success*: share of held-out generations "
    "that mention the concept; *success@k*: how many target tokens appear; *fluency*: (1 − repetition) × a perplexity "
    "factor (1 = as predictable as the unsteered model); *combined* = concept success × fluency, per generation."
)
PREVIOUS_PROTOCOL = (
    "**Previous protocol.** This run took every SAE candidate from the output side (the concept among the feature's "
    "logit-lens top-20) and picked by output score, by input score or at random, so its input- and output-score picks "
    "both already promote the concept. It is shown as it was measured, until a run of the current protocol replaces it; "
    "it cannot be resumed."
)
VIEWS = ("one run", "compare runs")


@dataclass(frozen=True)
class RunEntry:
    """One evaluation directory found on disk, with its meta.json (None and a problem when unreadable)."""

    path: Path
    meta: dict | None
    problem: str | None = None

    @property
    def bundled(self) -> bool:
        return is_within(self.path, [paths.EVAL_RESULTS])

    @property
    def where(self) -> str:
        for root in evaluate.eval_roots():
            if is_within(self.path, [root]):
                rel = self.path.resolve().relative_to(Path(root).resolve())
                return f"{'bundled' if self.bundled else 'cache'}: {rel}"
        return str(self.path)

    @property
    def short(self) -> str:
        if self.meta is None:
            return self.path.name
        return f"L{self.meta.get('layer')} · {self.meta.get('sae_id')}" + (" (bundled)" if self.bundled else "")

    @property
    def label(self) -> str:
        if self.meta is None:
            return f"{self.where} (unreadable)"
        return f"layer {self.meta.get('layer')} · {self.meta.get('sae_id')} · {self.meta.get('model')} — {self.where}"


def _entry(path: Path) -> RunEntry:
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("meta.json does not hold a JSON object")
        return RunEntry(path, meta)
    except (OSError, ValueError) as exc:
        return RunEntry(path, None, f"meta.json: {exc}")


def _valid(key: str, options: list, multi: bool = False) -> None:
    """Drop a remembered widget value that the current options no longer offer (another run was picked)."""
    if key not in st.session_state:
        return
    value = st.session_state[key]
    if multi:
        st.session_state[key] = [v for v in value if v in options]
    elif value not in options:
        del st.session_state[key]


def render(ctx: AppContext) -> None:
    st.title("Evaluation")
    from ..feature_eval import render_feature_level

    render_feature_level()
    st.divider()
    st.subheader("Concept level")
    st.caption(PROTOCOL)
    runs = [_entry(p) for p in evaluate.concept_runs()]
    if not runs:
        _empty_state(ctx)
        return
    view = st.radio("View", VIEWS, horizontal=True, key="ev_view", label_visibility="collapsed")
    if view == VIEWS[0]:
        _one_run(ctx, runs)
    else:
        _compare(runs)
    with st.expander("Run another evaluation"):
        _new_run_help(ctx)


# ---------------------------------------------------------------------------------------------------
# Empty state and commands


def _new_run_command(ctx: AppContext) -> str:
    choice = ctx.choice
    features = None
    if choice is not None and choice.spec.source != "bundled" and ctx.sae is not None:
        features = loaders.feature_data_dir(ctx.model_name, ctx.sae)
    return et.new_run_command(
        ctx.model_name,
        choice.spec.source if choice else None,
        choice.ref if choice else None,
        choice.layer if choice else None,
        features,
    )


def _new_run_help(ctx: AppContext) -> None:
    st.code(_new_run_command(ctx), language="bash")
    sae_id = ctx.sae.id if ctx.sae is not None else "<sae id>"
    out = evaluate.default_out_dir(ctx.model_name, sae_id)
    st.caption(
        f"Evaluates the SAE selected in the sidebar (another: `--layer L` for a bundled SAE, `--sae` otherwise; "
        f"`--n-concepts`, `--concepts FILE`, `--methods`, `--strengths` change the run). It writes to {et.md_text(out)}, "
        "where this page finds it; results shipped with the app lie under assets/eval/results/. One layer with 30 "
        "concepts can take an hour or more on a CPU; an interrupted run continues with `--resume`."
    )
    if ctx.choice is not None and ctx.choice.spec.source != "bundled" and ctx.sae is not None and loaders.feature_data_dir(ctx.model_name, ctx.sae) is None:
        st.caption("This SAE has no feature scores yet: compute them first (Features side by side page, or `python -m saesteer scores --all --out DIR`) and pass their directory with `--features`.")


def _empty_state(ctx: AppContext) -> None:
    roots = " and ".join(et.md_text(r) for r in evaluate.eval_roots())
    st.info(
        "**No evaluation results yet.** An evaluation steers the model toward a list of concepts with each method and "
        f"measures how often the text reaches the concept and how fluent it stays. This page looks for runs under {roots}. "
        "Produce one from a terminal:",
        icon=":material/science:",
    )
    _new_run_help(ctx)


# ---------------------------------------------------------------------------------------------------
# One run


def _default_run(ctx: AppContext, runs: list[RunEntry]) -> str:
    """A run of the SAE selected in the sidebar if there is one (the one ``eval`` writes by default first),
    else the first readable run."""
    if ctx.sae is not None:
        mine = [r for r in runs if r.meta and r.meta.get("sae_id") == ctx.sae.id and r.meta.get("model") == ctx.model_name]
        default = evaluate.default_out_dir(ctx.model_name, ctx.sae.id).resolve()
        for r in sorted(mine, key=lambda r: r.path.resolve() != default):
            return str(r.path)
    return str(next((r.path for r in runs if r.meta), runs[0].path))


def _one_run(ctx: AppContext, runs: list[RunEntry]) -> None:
    by_path = {str(r.path): r for r in runs}
    _valid("ev_run", list(by_path))
    if "ev_run" not in st.session_state:
        st.session_state["ev_run"] = _default_run(ctx, runs)
    c1, c2 = st.columns([4, 1])
    chosen = c1.selectbox("Run", list(by_path), format_func=lambda p: by_path[p].label, key="ev_run",
                          help="runs in the cache (written by `python -m saesteer eval`) and results shipped with the app")
    min_cand = c2.number_input("Min. candidates per concept", min_value=1, max_value=1000, value=1, step=1, key="ev_min_cand",
                               help="Keep only concepts with at least this many candidate features: with a single candidate, "
                               "all SAE picks steer with the same feature.")
    entry = by_path[chosen]
    if entry.problem:
        _broken(entry, entry.problem)
        return
    try:
        results = loaders.load_eval(str(entry.path), loaders.eval_stamp(entry.path))
        progress = evaluate.run_progress(results, entry.path)
    except Exception as exc:  # a damaged parquet/json file
        _broken(entry, f"{type(exc).__name__}: {exc}")
        return
    try:
        _show_run(ctx, entry, results, progress, int(min_cand))
    except StreamlitAPIException:
        raise
    except Exception as exc:  # readable files with unexpected contents (edited by hand, another version)
        _broken(entry, f"{type(exc).__name__}: {exc}")


def _broken(entry: RunEntry, problem: str) -> None:
    st.error(f"Could not read the evaluation in {et.md_text(entry.path)}: {et.md_text(problem)}", icon=":material/error:")
    st.caption(
        "A file in it is damaged (cut off, or edited by hand); other runs are not affected. To repair it, delete the "
        "damaged files under units/ (a unit is redone when its .json is missing) and continue with `--resume`, or "
        "delete the directory and run again."
    )


def _describe(meta: dict) -> str:
    params = meta.get("params") or {}
    n_pre = len(meta.get("prefixes") or [])
    n_test = len(meta.get("test_prefixes") or [])
    parts = [
        f"model {et.md_text(meta.get('model'))}",
        f"SAE {et.md_text(meta.get('sae_id'))} (layer {et.md_text(meta.get('layer'))})",
        f"{n_pre} prefixes, {n_test} reported",
        f"{params.get('max_new_tokens', '?')} new tokens",
        f"{len(params.get('strengths') or [])} strengths",
    ]
    if meta.get("judge"):
        parts.append(f"judge {et.md_text(meta['judge'])}")
    return " · ".join(parts)


def _show_run(ctx: AppContext, entry: RunEntry, results: evaluate.EvalResults, progress: evaluate.RunProgress, min_cand: int) -> None:
    meta = results.meta
    previous = results.previous_protocol
    st.caption(_describe(meta) + f" · {et.md_text(entry.where)}")
    if previous:
        st.info(PREVIOUS_PROTOCOL, icon=":material/history:")
    if not progress.finished and previous:
        st.warning(f"**This run of the previous protocol is incomplete** ({progress.n_done} concepts done); this version "
                   "cannot resume it: start a run of the current protocol with another `--out`.", icon=":material/hourglass_top:")
    elif not progress.finished:
        goal = f"{progress.n_done} of {et.plural(progress.target, 'concept')}" if progress.target else et.plural(progress.n_done, "concept")
        partly = f", {progress.n_partial} partly" if progress.n_partial else ""
        st.warning(
            f"**This run is incomplete** (interrupted, or still running; last written {_ago(entry.path / 'units')}): "
            f"{goal} done{partly}, {progress.n_skipped} skipped for lack of candidate features. "
            "`--resume` continues it where it stopped:",
            icon=":material/hourglass_top:",
        )
        command, notes = et.resume_command(meta, entry.path)
        st.code(command, language="bash")
        for note in notes:
            st.caption(note)
    common = st.checkbox("Compare methods on the concepts every method completed", value=True, key="ev_common",
                         help="Off: each method's mean is over the concepts it completed (methods that need input-side "
                         "candidates cover fewer concepts; the ratio below is always paired).")
    table = results.methods(min_cand, common)
    if table.empty or "concept_score" not in table.columns:
        st.info("No concept has results yet" + (" with that many candidates." if min_cand > 1 else ": the run has not finished its first concept."))
        _run_details(results, entry)
        return

    st.subheader("Methods")
    if previous:
        st.markdown(et.previous_headline(table))
    else:
        st.markdown(f"**{escape(evaluate.concept_headline(results), whitespace=True)}**")
    st.dataframe(et.method_display(table, previous), hide_index=True, column_config=_METHOD_COLUMNS, key="ev_methods")
    if not previous:
        st.caption("The paper's ratio, paired over the concepts that have both methods (delta-method standard error; "
                   f"the verdict needs the 95% interval, ratio ± {evaluate.report.Z95} s.e., to exclude 1):")
        st.dataframe(_ratio_table(results), hide_index=True, key="ev_ratios")
    st.download_button("Method table (CSV)", _csv(table), file_name=f"eval-methods-{_slug(meta)}.csv",
                       mime="text/csv", key="ev_methods_csv", on_click="ignore")
    figs, per_concept, generations, details = st.tabs(["Figures", "Per concept", "Generations", "Run details"])
    with figs:
        _figures(entry, results, table)
    with per_concept:
        _per_concept(ctx, results)
    with generations:
        _generations(results)
    with details:
        _run_details(results, entry)


def _ago(path: Path) -> str:
    try:
        secs = max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return "at an unknown time"
    if secs < 120:
        return f"{secs:.0f} s ago"
    return f"{secs / 60:.0f} min ago" if secs < 7200 else f"{secs / 3600:.0f} h ago"


_METHOD_COLUMNS = {
    "method": st.column_config.TextColumn("method"),
    "n_concepts": st.column_config.NumberColumn("concepts", format="%d", help="concepts every method completed"),
    "concept_score": st.column_config.NumberColumn("concept success", format="percent", help="share of held-out generations that mention the concept"),
    "concept_score_sem": st.column_config.NumberColumn("± s.e.", format="%.3f"),
    "success_k": st.column_config.NumberColumn("success@k", format="%.2f", help="target tokens (the feature's logit-lens top-k and the concept's tokens) present, per generation"),
    "fluency": st.column_config.NumberColumn("fluency", format="%.2f", help="(1 − repetition) × perplexity factor, 0..1"),
    "fluency_sem": st.column_config.NumberColumn("± s.e. ", format="%.3f"),
    "ppl": st.column_config.NumberColumn("perplexity", format="%.1f", help="under the unsteered model (median per concept, mean over concepts)"),
    "repetition": st.column_config.NumberColumn("repetition", format="%.2f"),
    "combined": st.column_config.NumberColumn("combined", format="%.3f", help="concept success × fluency per generation, averaged"),
    "combined_sem": st.column_config.NumberColumn("± s.e.  ", format="%.3f"),
    "judge_score": st.column_config.NumberColumn("judge", format="%.2f"),
}


def _csv(frame: pd.DataFrame):
    """The CSV of ``frame`` for a download button, built only when the user clicks (not on every rerun)."""
    return lambda: frame.to_csv(index=False).encode()


def _slug(meta: dict) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{meta.get('model')}-{meta.get('sae_id')}")[:80]


def _figures(entry: RunEntry, results: evaluate.EvalResults, table: pd.DataFrame) -> None:
    figs = loaders.eval_figures(str(entry.path), loaders.eval_stamp(entry.path))
    st.plotly_chart(evaluate.fig_methods(table), key="ev_fig_methods")
    st.markdown("**Strength curves** (train half): the strength with the best combined score is the one reported.")
    st.plotly_chart(figs["strength_sae"], key="ev_fig_strength_sae")
    if "diffmean" in set(results.generations["method"]):
        st.caption("DiffMean: coefficients in units of the mean residual norm at the layer.")
        st.plotly_chart(figs["strength_diffmean"], key="ev_fig_strength_dm")
    st.plotly_chart(figs["concepts"], key="ev_fig_concepts")


def _top_tokens(ctx: AppContext, meta: dict) -> dict[int, str] | None:
    """Logit-lens top tokens of the run's SAE, if the sidebar has that very SAE (same weights) loaded."""
    if ctx.data is None or ctx.sae is None or ctx.sae.id != meta.get("sae_id") or ctx.model_name != meta.get("model"):
        return None
    if loaders.weights_fingerprint(ctx.sae) != meta.get("sae_fingerprint"):
        return None
    table = ctx.data.table
    if "top_tokens" not in table.columns:
        return None
    short = table["top_tokens"].map(lambda s: " | ".join(str(s or "").split(" | ")[:6]))
    return dict(zip(table["feature"].astype(int), short))


def _ratio_table(results: evaluate.EvalResults) -> pd.DataFrame:
    rows = [{"ratio": f"{et.label(r.method)} ÷ {et.label(r.baseline)}", "concepts": r.n, "mean combined": r.mean,
             "activation pick's": r.mean_baseline, "ratio of means": r.ratio, "± s.e.": r.se} for r in results.ratios().values()]
    return pd.DataFrame(rows)


def _per_concept(ctx: AppContext, results: evaluate.EvalResults) -> None:
    meta = results.meta
    tokens = _top_tokens(ctx, meta)
    if results.previous_protocol:
        picks = et.concept_picks(results, tokens)
        st.markdown("**Features picked per concept** (previous protocol): the output-score, input-score and random pick among "
                    "the logit-lens candidates, their scores, the strength chosen on the train half, and what they reached on the test half.")
    else:
        picks = et.candidate_table(results, tokens)
        st.markdown("**Candidates per concept**: how many of each kind (input-side: fires on the concept; output-side: promotes it; "
                    "both: features of both kinds; filtered: input-side with output score ≥ τ), the picks with their firing share "
                    "and output score, the strength chosen on the train half and the combined score on the test half.")
    config = {c: st.column_config.NumberColumn(format="%.4f") for c in picks.columns if c.endswith("output score")}
    config |= {c: st.column_config.NumberColumn(format="%.2f") for c in picks.columns if c.endswith(("input score", "combined", "firing share", "(mean)"))}
    config |= {c: st.column_config.NumberColumn(format="percent") for c in picks.columns if c.endswith("concept score")}
    config |= {c: st.column_config.NumberColumn(format="%d") for c in picks.columns if c.endswith("feature")}
    st.dataframe(picks, hide_index=True, column_config=config, key="ev_picks")
    st.download_button("Picks (CSV)", _csv(picks), file_name=f"eval-picks-{_slug(meta)}.csv", mime="text/csv",
                       key="ev_picks_csv", on_click="ignore")
    if not results.previous_protocol:
        per_feature = et.filtered_features(results)
        if len(per_feature):
            st.markdown("**Output-filtered features, one by one** (each at its own strength; the concept's result is their mean)")
            st.dataframe(per_feature, hide_index=True, key="ev_filtered")
    st.markdown("**Every method per concept** (test half, at the chosen strength)")
    per = et.concept_results(results)
    st.dataframe(per, hide_index=True, key="ev_concepts")
    st.download_button("Per-concept results (CSV)", _csv(per), file_name=f"eval-concepts-{_slug(meta)}.csv",
                       mime="text/csv", key="ev_concepts_csv", on_click="ignore")
    skipped = et.skipped_concepts(results)
    if len(skipped):
        st.caption(f"{len(skipped)} concept{'s' if len(skipped) != 1 else ''} skipped:")
        st.dataframe(skipped, hide_index=True, key="ev_skipped")


def _generations(results: evaluate.EvalResults) -> None:
    gens = results.generations
    if gens.empty:
        st.info("No generations yet.")
        return
    concepts = list(pd.unique(gens["concept"].to_numpy(dtype=object)))
    present = set(gens["method"].unique())
    methods = [m for m in evaluate.KNOWN_METHODS if m in present]
    previous = results.previous_protocol
    _valid("ev_gen_concept", concepts)
    _valid("ev_gen_methods", methods, multi=True)
    c1, c2, c3 = st.columns([2, 4, 2])
    concept = c1.selectbox("Concept", concepts, key="ev_gen_concept")
    chosen = c2.multiselect("Methods", methods, default=methods, format_func=lambda m: et.label(m, previous), key="ev_gen_methods")
    split = c3.radio("Prefixes", ["test", "train", "both"], horizontal=True, key="ev_gen_split",
                     help="test: the reported half, each method at its chosen strength; train: every strength of the grid")
    view = et.generations_view(gens, [concept], chosen, split, previous)
    st.caption(f"{len(view):,} generations (continuations only; the prefix is in its own column).")
    st.dataframe(
        view, hide_index=True, key="ev_gens",
        column_config={
            "text": st.column_config.TextColumn("generated text", width="large"),
            "prefix": st.column_config.TextColumn("prefix"),
            "strength": st.column_config.NumberColumn(format="%g"),
            "ppl": st.column_config.NumberColumn("perplexity", format="%.1f"),
            "fluency": st.column_config.NumberColumn(format="%.2f"),
            "combined": st.column_config.NumberColumn(format="%.2f"),
        },
    )
    st.download_button("These generations (CSV)", _csv(view), file_name=f"eval-generations-{_slug(results.meta)}.csv",
                       mime="text/csv", key="ev_gens_csv", on_click="ignore")


def _run_details(results: evaluate.EvalResults, entry: RunEntry) -> None:
    meta = results.meta
    tps = et.tokens_per_second(results.timings)
    if math.isfinite(tps):
        t = results.timings
        st.caption(f"Batched decoding reached {tps:,.0f} tokens/s; {t['seconds'].sum():,.0f} s in all for {et.concepts_timed(t)} concepts.")
    report = entry.path / "report.html"
    if report.exists():
        st.caption(f"Self-contained report: {et.md_text(report)}")
    keep = ("model", "sae_id", "layer", "hook_name", "feature_scores", "judge", "ppl_ref", "finished", "params", "model_fingerprint", "sae_fingerprint")
    st.json({k: meta[k] for k in keep if k in meta}, expanded=False)
    prefixes = meta.get("prefixes") or []
    test = set(meta.get("test_prefixes") or [])
    if prefixes:
        st.dataframe(pd.DataFrame({"prefix": prefixes, "half": ["test (reported)" if i in test else "train (strength choice)" for i in range(len(prefixes))]}),
                     hide_index=True, key="ev_prefixes")
    goal = meta.get("run") or {}
    if goal.get("concepts"):
        st.caption(f"Concept list of the run ({goal.get('n_concepts') or 'all'} with candidates wanted):")
        st.dataframe(pd.DataFrame({"concept": goal["concepts"]}), hide_index=True, key="ev_goal_concepts")
    if len(results.generations):
        st.download_button("All generations (CSV)", _csv(results.generations), file_name=f"eval-all-generations-{_slug(meta)}.csv",
                           mime="text/csv", key="ev_all_gens_csv", on_click="ignore")


# ---------------------------------------------------------------------------------------------------
# Several runs


def _compare(runs: list[RunEntry]) -> None:
    readable = [r for r in runs if r.meta is not None]
    by_path = {str(r.path): r for r in readable}
    if not readable:
        st.error("None of the runs found can be read; see the single-run view for the reason.")
        return
    _valid("ev_compare_runs", list(by_path), multi=True)
    if "ev_compare_runs" not in st.session_state:
        first_model = readable[0].meta.get("model")
        st.session_state["ev_compare_runs"] = [p for p, r in by_path.items() if r.meta.get("model") == first_model][:6]
    chosen = st.multiselect("Runs", list(by_path), format_func=lambda p: by_path[p].label, key="ev_compare_runs",
                            help="e.g. the same model at an early and a late layer")
    metric = st.radio("Metric", ["combined", "concept_score", "success_k", "fluency"], horizontal=True, key="ev_compare_metric",
                      format_func=lambda m: {"concept_score": "concept success", "success_k": "success@k"}.get(m, m))
    frames, lines = [], []
    shorts = [by_path[p].short for p in chosen]
    for p, short in zip(chosen, shorts):
        entry = by_path[p]
        name = short if shorts.count(short) == 1 else f"{short} [{entry.where}]"
        try:
            results = loaders.load_eval(p, loaders.eval_stamp(entry.path))
            table = results.methods()
            progress = evaluate.run_progress(results, entry.path)
        except Exception as exc:  # a damaged run: say so and compare the others
            st.error(f"Could not read {et.md_text(entry.where)}: {et.md_text(f'{type(exc).__name__}: {exc}')}")
            continue
        if table.empty or "concept_score" not in table.columns:
            st.caption(f"{et.md_text(name)}: no concept finished yet.")
            continue
        frames.append(table.assign(run=name, layer=entry.meta.get("layer"), sae_id=entry.meta.get("sae_id"), model=entry.meta.get("model"),
                                   protocol="previous" if results.previous_protocol else "current"))
        status = "" if progress.finished else f" *(incomplete: {progress.n_done} concepts so far)*"
        if results.previous_protocol:
            lines.append(f"- **{et.md_text(name)}** (previous protocol){status}: {et.previous_headline(table)}")
        else:
            lines.append(f"- **{et.md_text(name)}**{status}: {escape(evaluate.concept_headline(results), whitespace=True)}")
    if not frames:
        st.info("Pick one or more runs with results.")
        return
    table = pd.concat(frames, ignore_index=True)
    st.plotly_chart(evaluate.fig_compare(table, metric), key="ev_compare_chart")
    st.markdown("\n".join(lines))
    cols = ["run", "model", "layer", "sae_id", "protocol", "method", "n_concepts", *[c for c in et.TABLE_COLUMNS if c in table.columns]]
    shown = table[cols].assign(method=[et.label(m, p == "previous") for m, p in zip(table["method"], table["protocol"])])
    st.dataframe(shown, hide_index=True, key="ev_compare_table",
                 column_config={k: v for k, v in _METHOD_COLUMNS.items() if k in shown.columns and k != "method"})
    st.download_button("Comparison (CSV)", _csv(table), file_name="eval-comparison.csv", mime="text/csv",
                       key="ev_compare_csv", on_click="ignore")

