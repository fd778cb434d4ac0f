"""Concept duel: what fires on a concept vs what says it, three columns streamed from one batch, live strength."""

from __future__ import annotations

import dataclasses
import time
from contextlib import closing

import streamlit as st

from ... import duel as duel_lib
from ... import presets as presets_lib
from ...config import LIVE_NEW_TOKENS, MAX_CONCEPT_CHARS, PAPER_TEMPERATURE, ConfigError
from ...steering import default_fast
from ...text import escape
from ..context import AppContext
from ..data import live_lens_tokens
from ..live import bank_for, defaults_for, device_line, forget_other_sae, shown_errors, strength_or_fallback
from ..render import contexts_html, token_chips_html
from ..session import CONCEPT, PRESENT, SEED, STRENGTH

COLORS = {"baseline": "#7f7f7f", "activation": "#1f77b4", "output": "#d62728"}
MANAGER_LINE = (
    "**What am I looking at?** Three continuations of the same sentence by the same model. Left: untouched. Middle: "
    "turned up the internal feature that *lights up* most reliably when the model reads the concept. Right: turned up "
    "the feature with the best **output score**, the one measured to *make the model say it*. The counters are the KPI: "
    "how often the concept is said, and whether the text stays fluent. The lesson for a meeting: **measure features by "
    "output score, not by what they light up on**; a small pilot like this one shows it in minutes, before anyone trains anything."
)
OOM_DUEL = "use fewer new tokens or a shorter prompt, or untick fast decode"
STRIP_KEY = "duel_strip"
LAST = "duel_last"
STRENGTH_FOR = "_duel_strength_for"
"""(SAE key, concept) the strength slider was last set for: a new concept or SAE gets its default strength."""


def text_box(prompt: str, continuation: str, color: str, large: bool = False) -> str:
    """A column's text; long unbroken strings wrap instead of running out of the column."""
    size = "1.5em" if large else "1.02em"
    return (
        f'<div class="saesteer-text" style="border-left: 5px solid {color}; padding: 0.4em 0.8em; white-space: pre-wrap; '
        f'overflow-wrap: anywhere; word-break: break-word; font-size: {size}; min-height: 5em;">'
        f'<span style="color: #888;">{escape(prompt)}</span>{escape(continuation)}</div>'
    )


def _counter(concept: str, text: str, final: duel_lib.ColumnStats | None = None) -> str:
    if final is not None:
        return f"“{concept}” said **{final.hits}×** · fluency **{final.fluency:.2f}** (repetition {final.repetition:.2f}, perplexity {final.perplexity:.1f})"
    return f"“{concept}” said **{duel_lib.hits(text, concept)}×** · fluency so far {duel_lib.live_fluency(text):.2f}"


def _pick_card(ctx: AppContext, column: str, duel: duel_lib.DuelPlan) -> None:
    st.markdown(f"**{duel_lib.TITLES[column]}**")
    if column not in duel.features:
        st.info(duel.missing[column])
        return
    cands = duel.candidates
    c = cands.activation_pick if column == "activation" else cands.output_pick
    inp = "not enough contexts" if c.input_score != c.input_score else f"{c.input_score:.2f}"
    st.markdown(
        f"Feature **{c.feature}** · fires on the concept in **{c.firing_share:.0%}** of its top contexts · "
        f"output score **{c.output_score:.3f}** (how reliably turning it up makes the model say its words) · input score {inp}"
    )
    if column == "activation":
        shown = ctx.data.contexts(c.feature, limit=3)
        st.html(f'<div style="overflow-wrap: anywhere;">{contexts_html(shown, limit=3)}</div>')
    else:
        st.html(token_chips_html(live_lens_tokens(ctx.lm, ctx.sae, c.feature, k=10)))


def _set_concept(sae: str, concept: str, strength: float) -> None:
    st.session_state["duel_concept"] = concept
    st.session_state["duel_strength"] = float(strength)
    st.session_state[STRENGTH_FOR] = (sae, concept.strip().lower())


def _default_strength(ctx: AppContext, d: presets_lib.Defaults, duel: duel_lib.DuelPlan) -> tuple[float, str]:
    f = duel.features.get("output", duel.features.get("activation"))
    if f is None:
        return (d.strength or presets_lib.FALLBACK_STRENGTH), "no pick to calibrate"
    for p in d.presets:
        if p.feature == f and p.strength is not None:
            return p.strength, p.evidence
    return presets_lib.feature_strength(ctx.lm, ctx.sae, d, f, bank_for(ctx))


def _presets(ctx: AppContext, d: presets_lib.Defaults, sae: str) -> None:
    if not d.presets:
        return
    cols = st.columns(len(d.presets) + 1)
    cols[0].markdown("**Presets**")
    for col, p in zip(cols[1:], d.presets):
        if col.button(p.concept, key=f"duel_preset_{p.concept}", help=p.evidence, use_container_width=True):
            with st.spinner(f"Calibrating the strength of feature {p.feature}…"):
                amp, measured = strength_or_fallback(lambda p=p: presets_lib.preset_strength(ctx.lm, ctx.sae, p)[0],
                                                     f"calibrating the strength of feature {p.feature}")
            _set_concept(sae, p.concept, amp)
            st.session_state["duel_autorun"] = True
            if measured:  # else this run goes on (the widgets come below), so that the error stays on the page
                st.rerun()


def _stream(ctx: AppContext, params: duel_lib.DuelParams, duel: duel_lib.DuelPlan, fast: bool, large: bool, key: duel_lib.DuelKey) -> dict:
    cols = st.columns(len(duel.columns))
    boxes, counters = {}, {}
    for col, name in zip(cols, duel.columns):
        col.markdown(f"**{duel_lib.TITLES[name]}**" + (f" · f{duel.features[name]}" if name in duel.features else ""))
        boxes[name] = col.empty()
        counters[name] = col.empty()
        boxes[name].html(text_box(params.prompt, "…", COLORS[name], large))
    texts = dict.fromkeys(duel.columns, "")
    t0 = time.perf_counter()
    first = None
    with closing(duel_lib.stream_duel(ctx.lm, ctx.sae, params, duel, fast=fast)) as pieces:
        for step in pieces:
            if first is None and any(step.values()):
                first = time.perf_counter() - t0
            for name, piece in step.items():
                if piece:
                    texts[name] += piece
                    boxes[name].html(text_box(params.prompt, texts[name] + "▌", COLORS[name], large))
                    counters[name].markdown(_counter(params.concept, texts[name]))
    elapsed = time.perf_counter() - t0
    stats = duel_lib.score(ctx.lm, params.prompt, params.concept, texts)
    for name in duel.columns:
        boxes[name].html(text_box(params.prompt, texts[name], COLORS[name], large))
        counters[name].markdown(_counter(params.concept, texts[name], stats[name]))
    return {"key": key, "texts": texts, "stats": stats, "first_s": first, "elapsed_s": elapsed, "columns": duel.columns}


def _show(last: dict, params: duel_lib.DuelParams, duel: duel_lib.DuelPlan, large: bool) -> None:
    cols = st.columns(len(last["columns"]))
    for col, name in zip(cols, last["columns"]):
        col.markdown(f"**{duel_lib.TITLES[name]}**" + (f" · f{duel.features[name]}" if name in duel.features else ""))
        col.html(text_box(params.prompt, last["texts"][name], COLORS[name], large))
        col.markdown(_counter(params.concept, last["texts"][name], last["stats"][name]))


def _strip(ctx: AppContext, params: duel_lib.DuelParams, duel: duel_lib.DuelPlan, fast: bool, run: duel_lib.DuelKey) -> None:
    steered = [c for c in duel.columns if c in duel.features]
    if not steered:
        return
    amps = duel_lib.strip_strengths(params.strength)
    key = (run, amps)
    st.markdown("**Strength strip**: short continuations at several strengths, one batch")
    grid = {}
    for name in steered:
        cols = st.columns(len(amps) + 1)
        cols[0].caption(duel_lib.TITLES[name])
        for col, a in zip(cols[1:], amps):
            grid[(name, a)] = col.empty()
    cached = st.session_state.get(STRIP_KEY)
    if cached and cached["key"] == key:
        texts = cached["texts"]
    else:
        texts = dict.fromkeys(grid, "")
        with closing(duel_lib.stream_strip(ctx.lm, ctx.sae, params, duel, amps, fast=fast)) as pieces:
            for step in pieces:
                for cell, piece in step.items():
                    if piece:
                        texts[cell] += piece
                        grid[cell].html(_cell(cell[1], texts[cell], COLORS[cell[0]], params.concept))
        st.session_state[STRIP_KEY] = {"key": key, "texts": texts}
    for cell, box in grid.items():
        box.html(_cell(cell[1], texts[cell], COLORS[cell[0]], params.concept))


def _cell(amp: float, text: str, color: str, concept: str) -> str:
    n = duel_lib.hits(text, concept)
    return (f'<div style="border-top: 3px solid {color}; font-size: 0.85em; overflow-wrap: anywhere; white-space: pre-wrap;">'
            f'<b>amp {amp:g}</b> · {n}×<br>{escape(text)}</div>')


def _present_css() -> None:
    st.html(
        "<style>html { font-size: 20px; } .stMainBlockContainer { max-width: 100% !important; padding-left: 2rem; "
        "padding-right: 2rem; } h1 { font-size: 2.6rem !important; }</style>"
    )


def render(ctx: AppContext) -> None:
    from ..common import require_data

    require_data(ctx)
    present = bool(st.session_state.get(PRESENT))
    if present:
        st.set_page_config(layout="wide", initial_sidebar_state="collapsed")
        _present_css()
    st.title("Concept duel")
    st.markdown(MANAGER_LINE)
    sae = forget_other_sae(ctx, "duel", (LAST, STRIP_KEY))
    d = defaults_for(ctx)
    fast_default = default_fast(ctx.lm)
    fast = bool(st.session_state.get("duel_fast", fast_default))
    st.caption(device_line(ctx, fast) + f" · Default strengths: {d.reason}.")
    _presets(ctx, d, sae)

    st.session_state.setdefault("duel_concept", st.session_state.get(CONCEPT) or (d.presets[0].concept if d.presets else "water"))
    c1, c2, c3, c4 = st.columns([3, 5, 2, 2])
    concept = c1.text_input("Concept", key="duel_concept", max_chars=MAX_CONCEPT_CHARS, help="a word or a short phrase, e.g. water")
    if not concept.strip():
        st.info("Type a concept (a word such as *water*) or click a preset.")
        return
    base = duel_lib.DUEL_CANDIDATES
    theta = float(st.session_state.get("duel_theta", base.theta))
    try:
        duel = duel_lib.plan(duel_lib.candidates(ctx.lm, bank_for(ctx), concept, dataclasses.replace(base, theta=theta)))
    except ConfigError as exc:
        st.error(str(exc))
        return
    strength_for = (sae, concept.strip().lower())
    if st.session_state.get(STRENGTH_FOR) != strength_for:
        url_amp = st.session_state.get(STRENGTH) if STRENGTH_FOR not in st.session_state else None
        if isinstance(url_amp, (int, float)) and 0 <= float(url_amp) <= duel_lib.MAX_AMP:
            st.session_state["duel_strength"] = float(url_amp)  # a link (or the lab) named the strength
        else:  # a new concept or a new SAE: the strength calibrated for it
            with st.spinner("Finding a fluent strength…"):
                st.session_state["duel_strength"] = strength_or_fallback(lambda: _default_strength(ctx, d, duel)[0])[0]
        st.session_state[STRENGTH_FOR] = strength_for
    strength = c2.slider("Strength (paper amp, both steered columns)", 0.0, duel_lib.MAX_AMP, step=0.05, key="duel_strength",
                         help="x_last += amp · max_j a_j(x) · W_dec[f] at every step; released, it restarts the columns when Live is on")
    st.session_state.setdefault("duel_seed", int(st.session_state.get(SEED) or 0))
    seed = int(c3.number_input("Seed", 0, 2**31 - 1, key="duel_seed"))
    live = c4.toggle("Live", value=True, key="duel_live", help="restart the columns whenever the strength, concept or seed changes")
    with st.expander("More settings"):
        s1, s2, s3 = st.columns(3)
        temperature = s1.slider("Temperature", 0.0, 2.0, PAPER_TEMPERATURE, 0.05, key="duel_temp", help="the paper samples at 0.7; 0 = greedy")
        max_new = s2.slider("New tokens per column", 4, 96, LIVE_NEW_TOKENS, key="duel_max_new")
        s3.checkbox("Fast decode (bf16 copy of the model)", value=fast_default, key="duel_fast", help="CPU only; on CUDA the exact model is fast")
        st.toggle("Strength strip", value=True, key="duel_strip_on")
        st.number_input("Fires on the concept: at least this share of a feature's top contexts peak on it", 0.05, 1.0,
                        value=float(base.theta), step=0.05, key="duel_theta", help="the activation pick's threshold (the evaluation uses 0.5)")
        st.toggle("Presenter view (large type, sidebar collapsed; the URL reproduces it)", key="duel_present_toggle",
                  value=present, on_change=lambda: st.session_state.update({PRESENT: st.session_state["duel_present_toggle"]}))
    st.session_state[CONCEPT] = concept.strip()
    st.session_state[SEED] = seed
    st.session_state[STRENGTH] = float(strength)
    try:
        params = duel_lib.DuelParams(concept=concept.strip(), strength=float(strength), temperature=float(temperature), seed=seed, max_new_tokens=int(max_new))
    except ConfigError as exc:
        st.error(str(exc))
        return

    left, right = st.columns(2)
    with left:
        _pick_card(ctx, "activation", duel)
    with right:
        _pick_card(ctx, "output", duel)

    clicked = st.button("Duel", type="primary", key="duel_go")
    autorun = st.session_state.pop("duel_autorun", False)
    key = params.key(sae, theta)
    last = st.session_state.get(LAST)
    wanted = clicked or autorun or (live and (last is None or last["key"] != key))
    if wanted:
        with shown_errors("streaming the duel", OOM_DUEL):
            st.session_state[LAST] = last = _stream(ctx, params, duel, fast, present, key)
    elif last is not None and last["key"] == key:
        _show(last, params, duel, present)
    else:
        st.caption("Press **Duel** (or turn Live on) to stream the three columns.")
        last = None
    if last is not None and last["key"] == key:
        st.markdown("**Verdict.** " + duel_lib.verdict(duel, last["stats"], params.strength))
        if last.get("first_s") is not None:
            n = sum(len(ctx.lm.tokenizer(t, add_special_tokens=False).input_ids) for t in last["texts"].values())
            st.caption(f"first token after {last['first_s']:.2f} s · {n} tokens in {last['elapsed_s']:.1f} s across the columns")
        if st.session_state.get("duel_strip_on", True):
            with shown_errors("streaming the strength strip", OOM_DUEL):
                _strip(ctx, params, duel, fast, key)
