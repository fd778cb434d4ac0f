"""Feature card: logit lens, output-score and input-score details, top contexts, activation histogram."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from ... import plots
from .. import diagnostics_panel, neuronpedia_panel, score_plan
from ..common import require_data
from ..context import AppContext
from ..data import card_dict, context_max_tokens, lens_frames
from ..exports import card_json, steering_vector
from ..render import contexts_html, md_token, token_chips_html
from ..session import MODE, STRENGTH, select_feature, steer_with
from ..tables import norm_token, split_tokens

def _fmt(value: float, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def output_details_view(details: pd.DataFrame) -> pd.DataFrame:
    """Ranks as text ("≥ 1000" where only a lower bound is known, "–" without output scores)."""
    view = details.drop(columns=[c for c in ("token_id", "rank_exact") if c in details.columns]).copy()
    if "rank" in details.columns:
        exact = details["rank_exact"] if "rank_exact" in details.columns else details["rank"] >= 0
        view["rank"] = [("–" if r < 0 else str(r) if e else f"≥ {r}") for r, e in zip(details["rank"], exact)]
    return view


def feature_picker(ctx: AppContext, key: str) -> int:
    """A feature-id input bound to the shared selection (``ctx.feature``), which it initialises and updates."""
    width = ctx.sae.width
    current = ctx.feature
    if current is not None and not 0 <= current < width:
        st.error(f"feature {current} does not exist in SAE {ctx.sae.id}: use an id from 0 to {width - 1}")
        current = None
    if current is None:
        table = ctx.data.table if ctx.data is not None else None
        current = int(table.sort_values("output_score", ascending=False)["feature"].iloc[0]) if table is not None and len(table) else 0
        select_feature(current)
    # The shared key is the source of truth; the widget's callback writes to it before the next run.
    st.session_state[key] = current
    st.number_input(f"Feature (0–{width - 1})", min_value=0, max_value=width - 1, step=1, key=key, on_change=lambda: select_feature(st.session_state[key]))
    return current


def render(ctx: AppContext) -> None:
    st.title("Feature card")
    data = require_data(ctx)
    feature = feature_picker(ctx, "fc_feature")
    rows = data.table[data.table["feature"] == feature]
    if rows.empty:
        score_plan.offer_feature(ctx, data, feature)
        st.stop()
    row = rows.iloc[0]
    top = split_tokens(row["top_tokens"])
    st.markdown(f"#### Feature {feature} · layer {ctx.sae.layer} · promotes " + ", ".join(md_token(t) for t in top[:5]))

    m = st.columns(6)
    m[0].metric("Output score", _fmt(float(row["output_score"]), ".4f"), help="(1 − min rank/|V|) · max probability of the top lens tokens after amplification")
    m[1].metric("Input score", _fmt(float(row["input_score"]), ".2f"), help="share of top contexts whose max-activating token is a top lens token")
    m[2].metric("Density", _fmt(float(row["density"]), ".2e"), help="share of corpus tokens on which it fires")
    m[3].metric("Max activation", _fmt(float(row["max_activation"]), ".3g"))
    m[4].metric("Best rank", _fmt(float(row["min_rank"]), ".0f"), help="rank of the best top lens token after amplification (0 = most likely)")
    m[5].metric("Max prob", _fmt(float(row["max_prob"]), ".3f"))

    b1, b2, b3 = st.columns(3)
    strength = float(st.session_state.get(STRENGTH) or 4.0)
    if b1.button("Steer with this feature", type="primary", key="fc_steer"):
        steer_with([(feature, strength)])
    b2.download_button("Feature card (JSON)", card_json(card_dict(ctx, data, feature)), file_name=f"feature-{feature}-L{ctx.sae.layer}.json", mime="application/json", key="fc_json", on_click="ignore")
    b3.download_button(
        "Steering vector (safetensors)",
        steering_vector(ctx.sae, [feature], [strength], st.session_state.get(MODE) or "paper", ctx.model_name),
        file_name=f"steer-f{feature}-L{ctx.sae.layer}.safetensors",
        mime="application/octet-stream",
        key="fc_vector",
        on_click="ignore",
    )
    neuronpedia_panel.link(ctx.sae, feature)

    lens_tab, out_tab, in_tab, ctx_tab, act_tab = st.tabs(["Logit lens", "Output score", "Input score", "Top contexts", "Activations"])
    top_frame, bottom_frame = lens_frames(data, feature)
    with lens_tab:
        st.caption("The feature's decoder direction read through the model's final norm and unembedding: the tokens it pushes up and down.")
        c1, c2 = st.columns(2)
        with c1:
            st.markdown("**Promoted (top logits)**")
            st.html(token_chips_html(top_frame["token"].tolist(), top_frame["logit"].tolist(), color="#d62728"))
            st.plotly_chart(plots.logit_bars(top_frame["token"].tolist(), top_frame["logit"].tolist()), key="fc_top_bars")
        with c2:
            st.markdown("**Suppressed (bottom logits)**")
            st.html(token_chips_html(bottom_frame["token"].tolist(), bottom_frame["logit"].tolist(), color="#1f77b4"))
            st.plotly_chart(plots.logit_bars(bottom_frame["token"].tolist(), bottom_frame["logit"].tolist(), color=plots.INPUT_COLOR), key="fc_bottom_bars")
    with out_tab:
        st.caption(
            "On the neutral prompt, the feature is amplified at the last position (10 × the largest SAE activation there) "
            "and the model predicts the next token. Ranks (0 = most likely) and probabilities of its top lens tokens:"
        )
        score_params = data.meta.get("params", {})
        if "prompt" in score_params and "amp" in score_params:
            diagnostics_panel.caption(ctx, score_params["prompt"], feature, float(score_params["amp"]), where="At this amplification: ")
        st.dataframe(output_details_view(data.output_details(feature)), hide_index=True, key="fc_out_details", column_config={
            "prob": st.column_config.ProgressColumn("prob after amplification", min_value=0.0, max_value=1.0, format="%.4f"),
            "lens_logit": st.column_config.NumberColumn("lens logit", format="%.3f"),
        })
    with in_tab:
        contexts = data.contexts(feature)
        lens_set = {norm_token(t) for t in top}
        max_tokens = context_max_tokens(contexts)
        hits = [norm_token(t) in lens_set for t in max_tokens]
        if contexts:
            st.markdown(f"{sum(hits)} of {len(hits)} top contexts peak on one of the feature's top lens tokens" + (" (input score needs at least 10 contexts)." if len(hits) < 10 else "."))
            st.dataframe(pd.DataFrame({"context": range(1, len(max_tokens) + 1), "max token": max_tokens, "activation": [c.activation for c in contexts], "in lens top-k": hits}), hide_index=True, key="fc_in_details")
        else:
            st.markdown("No recorded contexts: this feature never fired on the corpus pass.")
        neuronpedia_panel.import_panel(ctx, data, feature)
    with ctx_tab:
        n_show = st.slider("Contexts shown", 1, max(1, len(contexts)), min(20, max(1, len(contexts))), key="fc_n_ctx") if len(contexts) > 1 else 1
        st.html(contexts_html(contexts, limit=n_show))
    with act_tab:
        edges, counts = data.histogram(feature)
        st.plotly_chart(plots.activation_histogram(edges, counts), key="fc_hist")
        st.caption(f"Density {_fmt(float(row['density']), '.3%')}: the share of corpus tokens on which the feature is active.")
