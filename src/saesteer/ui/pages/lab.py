"""Steering lab: baseline and steered continuations streamed side by side, a strength sweep, a demo mode."""

from __future__ import annotations

import math
import numbers
import time
from contextlib import closing

import pandas as pd
import streamlit as st
import torch

from ... import plots
from ... import presets as presets_lib
from ...config import (
    LIVE_NEW_TOKENS,
    MAX_ABS_STRENGTH,
    NEUTRAL_PROMPT,
    PAPER_STRENGTHS,
    PAPER_TEMPERATURE,
    ConfigError,
    SteerParams,
)
from ...steering import default_fast, generate, stream_pair
from ...text import escape, split_tokens
from .. import diagnostics_panel
from ..context import AppContext
from ..data import live_lens_tokens
from ..exports import steering_vector
from ..live import bank_for, defaults_for, device_line, forget_other_sae, shown_errors, strength_or_fallback
from ..render import md_token
from ..session import FEATURE, LAB_ROWS, MODE, PROMPT, STRENGTH
from ..sweep import concept_hits, concept_targets, score_texts
from ..tables import demo_features

MODES = {
    "paper": "paper amp: x_last += amp · max_j a_j(x) · W_dec[f]",
    "additive": "additive coefficient: x += c · W_dec[f] at every position",
}
DEFAULT_STRENGTH = {"paper": presets_lib.FALLBACK_STRENGTH, "additive": 40.0}
"""Only where a feature has no measured default (see :func:`default_strength`); paper: the paper's median best factor."""
RESULTS = ("lab_last", "lab_sweep_result")
"""The session keys of what the lab generated (dropped when the SAE changes)."""
MAX_FEATURES = 6
SWEEP_DEFAULT = (0.0, 0.8, 2.0, 4.0, 8.0, 20.0)
FAST_LABEL = "Fast decode (bf16 copy of the whole model)"
FAST_HELP = (
    "Both columns decode with a reduced-precision bfloat16 copy of the whole model, made once and kept in "
    "memory (about 0.54 GB more for Gemma 3 270M; about 2.5 times the float32 speed on a CPU). Greedy tokens "
    "come from the float32 unembedding of its hidden states, screened by a 4-bit copy of it (85 MB). Its text "
    "follows float32 for a while and may then take another path. Untick for the exact float32 model. "
    "The strength sweep and all scores always use float32."
)
CPU_HINT = "or load the model on the cpu (sidebar: Device and precision; other sessions and jobs on this device share its memory)"
OOM_PAIR = f"use fewer new tokens or a shorter prompt, untick fast decode (its bf16 copy of the model takes memory), {CPU_HINT}"
OOM_SWEEP = f"choose fewer strengths, use fewer new tokens, or skip the sweep; {CPU_HINT}"


def strength_range(mode: str, max_activation: float | None) -> float:
    """Slider bound: paper amps go to 20 (the paper's grid); additive coefficients scale with the feature."""
    if mode == "paper":
        return 20.0
    scale = 10.0 * float(max_activation) if max_activation and max_activation > 0 else 200.0
    return float(min(MAX_ABS_STRENGTH, max(50.0, round(scale, -1))))


def _max_act(ctx: AppContext, feature: int) -> float | None:
    if ctx.data is None:
        return None
    rows = ctx.data.table[ctx.data.table["feature"] == feature]
    return float(rows["max_activation"].iloc[0]) if len(rows) else None


def _defaults(ctx: AppContext) -> presets_lib.Defaults | None:
    if ctx.data is None:
        return None
    return defaults_for(ctx)


def _default_feature(ctx: AppContext) -> int:
    """The feature the lab starts from when none (or none that exists) is selected: the first demo preset (a
    feature whose top logit-lens token is a word, picked from the evaluation or by the fallback), else the top
    output score among word-led features, else the top output score, else 0."""
    d = _defaults(ctx)
    if d is not None and d.presets:
        return d.presets[0].feature
    if ctx.data is not None and len(ctx.data.table):
        words = demo_features(ctx.data.table, n=1)
        table = words if len(words) else ctx.data.table.sort_values("output_score", ascending=False)
        return int(table["feature"].iloc[0])
    return 0


def default_strength(ctx: AppContext, feature: int, mode: str = "paper") -> float:
    """A feature's default paper amp from its measured fluent range (:mod:`saesteer.presets`: the evaluation's
    best amp at this layer, else the feature's calibration); additive mode keeps its fixed default."""
    d = _defaults(ctx)
    if mode != "paper" or d is None:
        return DEFAULT_STRENGTH[mode]
    for p in d.presets:
        if p.feature == feature:
            return presets_lib.preset_strength(ctx.lm, ctx.sae, p)[0]
    try:
        return presets_lib.feature_strength(ctx.lm, ctx.sae, d, feature, bank_for(ctx))[0]
    except KeyError:  # a feature the data does not cover
        return DEFAULT_STRENGTH[mode]


def _initial_rows(ctx: AppContext) -> list[dict]:
    """One row from the shared selection; ids and strengths are checked (with a message) by :func:`_rows_editor`."""
    feature = st.session_state.get(FEATURE)
    strength = st.session_state.get(STRENGTH)
    feature = _default_feature(ctx) if feature is None else feature
    if strength is None:
        if isinstance(feature, int) and 0 <= feature < ctx.sae.width:
            with st.spinner("Finding a fluent strength for this feature…"):
                strength = strength_or_fallback(lambda: default_strength(ctx, feature), f"finding a fluent strength for feature {feature}")[0]
        else:
            strength = DEFAULT_STRENGTH["paper"]
    return [{"feature": feature, "strength": strength}]


def _checked_row(ctx: AppContext, row: dict, mode: str) -> None:
    """Replace a feature id the SAE does not have, or a strength that is not a finite number, by the default,
    saying so: a bad value from a link or the session must not turn silently into another one. Finite
    strengths beyond the slider's range are clamped to it."""
    width = ctx.sae.width
    feature = row["feature"]
    if isinstance(feature, numbers.Integral) and not isinstance(feature, bool) and 0 <= feature < width:
        row["feature"] = int(feature)
    else:
        row["feature"] = _default_feature(ctx)
        st.error(f"feature {feature!r} does not exist in SAE {ctx.sae.id}: use an id from 0 to {width - 1}; showing feature {row['feature']} instead")
    try:
        strength = float(row["strength"])
    except (TypeError, ValueError):
        strength = math.nan
    if not math.isfinite(strength):
        strength = DEFAULT_STRENGTH[mode]
        st.error(f"strength {row['strength']!r} of feature {row['feature']} is not a finite number: refused, set to {strength:g}")
    bound = strength_range(mode, _max_act(ctx, row["feature"]))
    row["strength"] = min(max(-bound, strength), bound)


COLORS = ("#7f7f7f", "#d62728")  # baseline, steered


def _text_box(prompt: str, continuation: str, color: str) -> str:
    return (
        f'<div style="border-left: 4px solid {color}; padding: 0.4em 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; '
        f'word-break: break-word; font-size: 1.02em; min-height: 4em;">'
        f'<span style="color: #888;">{escape(prompt)}</span>{escape(continuation)}</div>'
    )


def _stream_pair_into(boxes, prompt: str, pieces, since: float) -> tuple[str, str, float | None]:
    """Render ``pieces`` ((baseline, steered) text increments of one 2-row decode) into the two placeholders
    ``boxes`` as they come, both columns at once; returns both texts and the seconds from ``since`` (the
    click) to the first steered piece. The stream is closed even when the run is interrupted (the user
    navigates away), which stops its decoding thread and frees the model."""
    texts = ["", ""]
    first = None
    with closing(pieces):
        for step in pieces:
            if first is None and step[1]:
                first = time.perf_counter() - since
            for i, piece in enumerate(step):
                if piece:
                    texts[i] += piece
                    boxes[i].html(_text_box(prompt, texts[i] + "▌", COLORS[i]))
    for i in range(2):
        boxes[i].html(_text_box(prompt, texts[i], COLORS[i]))
    return texts[0], texts[1], first


def _rows_editor(ctx: AppContext, mode: str) -> list[dict]:
    rows: list[dict] = st.session_state[LAB_ROWS]
    width = ctx.sae.width

    def update(i: int, field: str, key: str) -> None:
        rows[i][field] = st.session_state[key]

    remove = None
    for i, row in enumerate(rows):
        _checked_row(ctx, row, mode)
        bound = strength_range(mode, _max_act(ctx, row["feature"]))
        st.session_state[f"lab_f{i}"] = row["feature"]
        st.session_state[f"lab_s{i}"] = row["strength"]
        c1, c2, c3, c4 = st.columns([2, 6, 4, 1])
        c1.number_input("Feature", 0, width - 1, step=1, key=f"lab_f{i}", on_change=update, args=(i, "feature", f"lab_f{i}"))
        c2.slider("Strength" + (" (amp)" if mode == "paper" else " (coefficient)"), -bound, bound, step=0.1 if mode == "paper" else 1.0, key=f"lab_s{i}", on_change=update, args=(i, "strength", f"lab_s{i}"))
        tokens = live_lens_tokens(ctx.lm, ctx.sae, row["feature"], k=6)
        c3.markdown("promotes " + ", ".join(md_token(t) for t in tokens))
        if len(rows) > 1 and c4.button("✕", key=f"lab_rm{i}", help="remove this feature"):
            remove = i
    if remove is not None:
        rows.pop(remove)
        st.rerun()
    if len(rows) < MAX_FEATURES and st.button("Add a feature", key="lab_add"):
        f = rows[-1]["feature"]
        amp, measured = strength_or_fallback(lambda: default_strength(ctx, f, mode), f"finding a fluent strength for feature {f}")
        rows.append({"feature": f, "strength": amp})
        if measured:  # else the error stays on the page; the new row shows from the next rerun
            st.rerun()
    return rows


def _demo_panel(ctx: AppContext) -> None:
    st.markdown(
        "**What you are looking at.** A language model's internal state can be broken into *features* with a sparse "
        "autoencoder. Some features merely *light up* when a topic is in the text; others, when turned up, *make the "
        "model talk about* that topic. The paper's lesson: **activation is not effect** — to steer a model without "
        "labels or training, choose features by their **output score**, which measures the effect directly."
    )
    if ctx.data is None:
        st.info("The demo presets need the feature scores of this SAE (see the Layers page).")
        return
    presets = demo_rows(ctx)
    if presets.empty:
        d = _defaults(ctx)
        searched = d is not None and d.source == "search"
        st.info(d.reason[:1].upper() + d.reason[1:] + "." if searched else "No feature with a word-like top token to demonstrate in this SAE.")
        return
    cols = st.columns(len(presets))
    for col, (_, row) in zip(cols, presets.iterrows()):
        words = split_tokens(row["top_tokens"])[:4]
        with col.container(border=True):
            st.markdown(f"**Feature {int(row['feature'])}** — the {md_token(words[0].strip())} feature" if words else f"**Feature {int(row['feature'])}**")
            st.markdown(
                "Turning it up makes the model use words like " + ", ".join(md_token(w) for w in words) + ". "
                f"Output score **{row['output_score']:.2f}** (how reliably turning it up changes what the model says); "
                + (f"input score {row['input_score']:.2f} (how often it lights up on those words when reading)." if row["input_score"] == row["input_score"] else "input score: not enough examples.")
            )
            if isinstance(row.get("evidence"), str) and row["evidence"]:
                st.caption(row["evidence"])
            if st.button("Try it", key=f"lab_demo_{int(row['feature'])}"):
                f = int(row["feature"])
                amp, measured = ((row["strength"], True) if row.get("strength") == row.get("strength") else
                                 strength_or_fallback(lambda: default_strength(ctx, f), f"finding a fluent strength for feature {f}"))
                st.session_state[LAB_ROWS] = [{"feature": f, "strength": float(amp)}]
                st.session_state["lab_mode"] = "paper"
                st.session_state["lab_prompt"] = NEUTRAL_PROMPT
                st.session_state["lab_autorun"] = True
                if measured:  # else this run goes on (the prompt and rows come below), so that the error stays on the page
                    st.rerun()


def demo_rows(ctx: AppContext) -> pd.DataFrame:
    """The demo mode's presets: the duel's (:func:`saesteer.presets.defaults`, each with its concept, amp and
    evidence); none where a preset search found none; else word-led features by output score
    (``tables.demo_features``, their amp calibrated on click)."""
    d = _defaults(ctx)
    table = ctx.data.table
    if d is not None and d.presets:
        rows = table.set_index("feature").loc[[p.feature for p in d.presets]].reset_index()
        rows["strength"] = [p.strength if p.strength is not None else float("nan") for p in d.presets]
        rows["evidence"] = [p.evidence for p in d.presets]
        return rows
    if d is not None and d.source == "search":  # searched, and no feature said its word: none to show
        return table.iloc[:0].assign(strength=float("nan"), evidence="")
    return demo_features(table, n=4).assign(strength=float("nan"), evidence="")


def _precision_note(fast: bool) -> str:
    return ("Both columns: fast decode, a reduced-precision **bf16 copy of the whole model**." if fast
            else "Both columns: the exact float32 model.")


def _run_pair(ctx: AppContext, prompt: str, params: SteerParams, fast: bool, clicked: float) -> None:
    """Baseline and steered continuations decoded together as one 2-row batch, both columns updated per token."""
    left, right = st.columns(2)
    left.markdown("**Baseline** (no steering)")
    right.markdown("**Steered**")
    boxes = (left.empty(), right.empty())
    for box, color in zip(boxes, COLORS):
        box.html(_text_box(prompt, "…", color))
    st.caption(_precision_note(fast) + " " + device_line(ctx, fast, rows=2))
    pieces = stream_pair(ctx.lm, prompt, sae=ctx.sae, params=params, fast=fast)
    baseline, steered, first = _stream_pair_into(boxes, prompt, pieces, clicked)
    st.session_state["lab_last"] = {
        "prompt": prompt, "baseline": baseline, "steered": steered, "features": params.features, "first_token_s": first, "fast": fast,
    }


def _show_last() -> None:
    last = st.session_state.get("lab_last")
    if not last:
        return
    left, right = st.columns(2)
    left.markdown("**Baseline** (no steering)")
    left.html(_text_box(last["prompt"], last["baseline"], COLORS[0]))
    right.markdown("**Steered**")
    right.html(_text_box(last["prompt"], last["steered"], COLORS[1]))
    st.caption(_precision_note(last.get("fast", False)))


def _last_summary(ctx: AppContext) -> None:
    last = st.session_state.get("lab_last")
    if not last:
        return
    words = _targets(ctx, last["features"])
    parts = []
    if words:
        parts.append(f"concept-token hits (the features' logit-lens words in the text): baseline {concept_hits(last['baseline'], words)}, steered {concept_hits(last['steered'], words)}")
    if last.get("first_token_s") is not None:
        parts.append(f"first steered token {last['first_token_s']:.2f} s after the click")
    if parts:
        st.caption(" · ".join(parts))


def _targets(ctx: AppContext, features) -> list[str]:
    tokens: list[str] = []
    for f in features:
        tokens += live_lens_tokens(ctx.lm, ctx.sae, int(f), k=20)
    return concept_targets(tokens)


def run_sweep(ctx: AppContext, prompt: str, features: list[int], grid: list[float], params: SteerParams) -> pd.DataFrame:
    """One batched generation over the grid (every feature at each strength), scored for concept hits and fluency."""
    strengths = torch.tensor([[s] * len(features) for s in grid], dtype=torch.float32)  # (n_grid, n_features)
    texts = generate(
        ctx.lm, [prompt] * len(grid), sae=ctx.sae, features=features, strengths=strengths, mode=params.mode,
        max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=[params.seed] * len(grid),
    )  # one seed per row: each strength samples as it would alone, so rows differ by strength only
    scores = score_texts(ctx.lm, prompt, texts, _targets(ctx, features))
    return pd.concat([pd.DataFrame({"strength": grid}), scores, pd.DataFrame({"text": texts})], axis=1)


def render(ctx: AppContext) -> None:
    st.title("Steering lab")
    from ..common import require_sae

    require_sae(ctx)
    sae = forget_other_sae(ctx, "lab", RESULTS)
    if st.toggle("Demo mode", key="lab_demo", help="preset features and plain-language explanations"):
        _demo_panel(ctx)
        st.divider()

    st.session_state.setdefault("lab_prompt", st.session_state.get(PROMPT) or NEUTRAL_PROMPT)
    prompt = st.text_area("Prompt", key="lab_prompt", height=80)
    st.session_state.setdefault("lab_mode", st.session_state.get(MODE) or "paper")
    mode = st.radio("Steering convention", list(MODES), format_func=MODES.get, key="lab_mode", horizontal=True)
    if mode == "paper":
        st.caption("Paper (Arad et al.): at every forward pass, the last position gets amp × (its largest SAE activation) × the feature's decoder direction.")
    else:
        st.caption("Neuronpedia-style: a fixed multiple of the feature's decoder direction is added at every position.")
    if LAB_ROWS not in st.session_state or not st.session_state[LAB_ROWS]:
        st.session_state[LAB_ROWS] = _initial_rows(ctx)
    rows = _rows_editor(ctx, mode)
    if mode == "paper":  # what each amp means here, in plain words
        for r in rows:
            diagnostics_panel.caption(ctx, prompt, int(r["feature"]), float(r["strength"]), where=f"Feature {int(r['feature'])}: ")

    with st.expander("Sampling", expanded=False):
        c1, c2, c3, c4 = st.columns(4)
        temperature = c1.slider("Temperature", 0.0, 2.0, PAPER_TEMPERATURE, 0.05, key="lab_temp", help="0 = greedy; the paper samples at 0.7")
        seed = int(c2.number_input("Seed", 0, 2**31 - 1, 0, key="lab_seed"))
        max_new = c3.slider("Max new tokens", 1, 256, LIVE_NEW_TOKENS, key="lab_max_new")
        fast = c4.checkbox(FAST_LABEL, value=default_fast(ctx.lm), key="lab_fast", help=FAST_HELP)

    st.session_state[PROMPT] = prompt
    st.session_state[MODE] = mode
    st.session_state[STRENGTH] = float(rows[0]["strength"])
    st.session_state[FEATURE] = int(rows[0]["feature"])
    try:
        params = SteerParams(
            features=tuple(int(r["feature"]) for r in rows), strengths=tuple(float(r["strength"]) for r in rows),
            mode=mode, max_new_tokens=int(max_new), temperature=float(temperature), seed=seed,
        )
    except ConfigError as exc:
        st.error(str(exc))
        st.stop()

    autorun = st.session_state.pop("lab_autorun", False)
    g1, g2 = st.columns([1, 4])
    go = g1.button("Generate", type="primary", key="lab_go")
    live = g2.toggle("Live", value=True, key="lab_live", help="restart generation whenever a strength, feature, prompt or sampling setting changes")
    key = (sae, prompt, params, fast)
    last = st.session_state.get("lab_last")
    if go or autorun or (live and (last is None or last.get("key") != key)):
        clicked = time.perf_counter()
        with shown_errors("generating the baseline and steered texts", OOM_PAIR):
            _run_pair(ctx, prompt, params, fast, clicked)
            st.session_state["lab_last"]["key"] = key
    else:
        _show_last()
    _last_summary(ctx)

    with st.expander("Strength sweep: concept hits and fluency against strength"):
        st.caption("Every selected feature is set to each strength in turn; one batched generation covers the grid. "
                   "Concept hits: the features' logit-lens words in the text. Perplexity: of the text under the unsteered model.")
        options = sorted(set((0.0,) + PAPER_STRENGTHS)) if mode == "paper" else [0.0, 10.0, 20.0, 50.0, 100.0, 200.0, 400.0]
        default = [s for s in SWEEP_DEFAULT if s in options] if mode == "paper" else options[:5]
        grid = st.multiselect("Strengths", options, default=default, key=f"lab_grid_{mode}")
        if st.button("Run sweep", key="lab_sweep") and grid:
            with st.spinner(f"Generating {len(grid)} continuations…"), shown_errors(f"running the sweep ({len(grid)} continuations in one batch)", OOM_SWEEP):
                st.session_state["lab_sweep_result"] = run_sweep(ctx, prompt, [int(r["feature"]) for r in rows], sorted(grid), params)
        result = st.session_state.get("lab_sweep_result")
        if result is not None:
            st.plotly_chart(plots.sweep_figure(result), key="lab_sweep_chart")
            st.dataframe(result, hide_index=True, key="lab_sweep_table")

    st.download_button(
        "Steering vector (safetensors)",
        steering_vector(ctx.sae, list(params.features), list(params.strengths), mode, ctx.model_name),
        file_name=f"steer-L{ctx.sae.layer}-{'-'.join(map(str, params.features))}.safetensors",
        mime="application/octet-stream",
        key="lab_vector",
        on_click="ignore",
    )
