"""Start page: what the app shows, in plain words, and where to go."""

from __future__ import annotations

import streamlit as st

from ..context import AppContext
from ..nav import link


def render(ctx: AppContext) -> None:
    st.title("SAEs are good for steering — if you select the right features")
    st.markdown(
        "A sparse autoencoder (SAE) splits a language model's internal state into thousands of *features*. "
        "Each feature has two sides:\n\n"
        "- **input side** — what makes it fire (the text it reacts to), measured by the **input score**;\n"
        "- **output side** — what it does to the model's next word when turned up, measured by the **output score**.\n\n"
        "Arad, Mueller & Belinkov (EMNLP 2025) show that these rarely coincide — **activation is not effect** — and that "
        "steering with features chosen by output score works far better, with no labels and no training."
    )
    if ctx.errors:
        for problem in ctx.errors:
            st.error(problem)
    elif ctx.sae is not None:
        status = "scores ready" if ctx.data is not None else "scores not computed yet"
        st.success(f"Model **{ctx.model_name}**, SAE **{ctx.sae.id}** (layer {ctx.sae.layer}, {ctx.sae.width:,} features): {status}.")
    st.markdown("#### Where to go")
    link("duel", "Concept duel: see it in one click")
    st.caption("Type a concept: what fires on it vs what says it, streamed side by side. Start here for a demo.")
    c1, c2 = st.columns(2)
    with c1:
        link("layers")
        st.caption("Score distributions across layers and the input-vs-output scatter.")
        link("features")
        st.caption("Every feature ranked both ways, side by side.")
        link("card")
        st.caption("One feature in depth: lens tokens, contexts, scores.")
    with c2:
        link("concepts")
        st.caption("Type a concept, get the features that say it.")
        link("lab")
        st.caption("Steer the model live; demo mode for presentations.")
        link("evaluation")
        st.caption("Does output-score selection steer better? Measured, against baselines.")
