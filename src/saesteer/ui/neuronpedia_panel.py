"""The feature card's Neuronpedia parts: a link to the feature's page, and imported activation exports.

The link is a plain anchor built from the SAE's Neuronpedia id (sae-lens' directory): nothing is fetched
and nothing opens until the user clicks it. Imported exports stay in the session and give the paper's own
input score (its top contexts came from Neuronpedia) next to the one from our corpus pass.
"""

from __future__ import annotations

import math

import streamlit as st

from .. import neuronpedia
from .render import contexts_html

_STORE = "np_exports"


def link(sae, feature: int) -> None:
    np_id = neuronpedia.neuronpedia_id(sae)
    if np_id is None:
        return
    st.link_button("Open on Neuronpedia", neuronpedia.feature_url(np_id, feature), icon=":material/open_in_new:",
                   help=f"neuronpedia.org/{np_id}/{feature} in a new tab (only when you click)")


def exports_of(sae_id: str) -> dict:
    """Feature -> records imported in this session for the SAE ``sae_id``."""
    return st.session_state.setdefault(_STORE, {}).setdefault(sae_id, {})


def import_panel(ctx, data, feature: int) -> None:
    """Upload Neuronpedia exports; for ``feature``, the input score from its exported top contexts and those contexts."""
    store = exports_of(ctx.sae.id)
    files = st.file_uploader(
        "Neuronpedia activation exports (JSON)", type="json", accept_multiple_files=True, key="fc_np_files",
        help="a feature's JSON as Neuronpedia exports it (an 'activations' list of records with 'tokens' and 'values'), "
        "one or many; the feature id comes from its 'index' field or a file name FEATURE.json / LAYER_FEATURE.json",
    )
    for f in files or []:
        try:
            store.update(neuronpedia.parse_export(f.getvalue(), f.name))
        except neuronpedia.ExportError as exc:
            st.error(str(exc))
    records = store.get(int(feature))
    if records is None:
        if store:
            st.caption(f"Imported exports cover features {', '.join(map(str, sorted(store)[:12]))}{' …' if len(store) > 12 else ''}; not {feature}.")
        return
    try:
        score = neuronpedia.input_scores_from_exports({int(feature): records}, data.lens, ctx.lm.tokenizer)[int(feature)]
    except neuronpedia.ExportError as exc:
        st.error(str(exc))
        return
    used = min(len(records), neuronpedia.INPUT_MAX_CONTEXTS)
    value = "not enough data (fewer than 10 contexts)" if math.isnan(score) else f"{score:.2f}"
    st.markdown(f"**Input score from the Neuronpedia export: {value}** over its first {used} contexts "
                "(the paper's rule: each context's max-activating token, as a token id, among the top lens tokens).")
    st.html(contexts_html(neuronpedia.contexts(records), limit=20))
