"""Session-state keys shared by the pages, and the hand-offs between pages that go through them.

These keys are not bound to a widget, so they survive page switches; the sidebar mirrors them in the URL.
Widget keys stay in their page, prefixed per page (``fc_`` card, ``lab_`` lab, ...).
"""

from __future__ import annotations

import streamlit as st

from .nav import goto

FEATURE = "feature"
PROMPT = "prompt"
STRENGTH = "strength"
MODE = "mode"
#: The concept duel's concept, sampling seed and presenter view (mirrored in the URL like the keys above).
CONCEPT = "concept"
SEED = "seed"
PRESENT = "present"
#: Features (and their strengths) the steering lab starts with: ``[{"feature": int, "strength": float}]``.
LAB_ROWS = "lab_rows"


def select_feature(feature: int | None) -> None:
    st.session_state[FEATURE] = None if feature is None else int(feature)


def steer_with(features: list[tuple[int, float]]) -> None:
    """Preselect ``features`` ((id, strength) pairs) in the steering lab and go there."""
    st.session_state[LAB_ROWS] = [{"feature": int(f), "strength": float(s)} for f, s in features]
    if features:
        st.session_state[FEATURE] = int(features[0][0])
    goto("lab")
