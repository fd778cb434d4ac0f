"""Every page's frame: page config, the shared sidebar, and the URL updated when the page ends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st

from .context import AppContext
from .sidebar import render_sidebar, sync_query_params


@contextmanager
def page() -> Iterator[AppContext]:
    """Page config, the shared sidebar, and the URL updated when the page ends (also when it ends early
    through ``st.stop()`` or ``st.switch_page``). Every page (``app.py`` and ``pages/*.py``) runs inside it."""
    st.set_page_config(page_title="saesteer", page_icon=":material/tune:", layout="wide")
    ctx = render_sidebar()
    try:
        yield ctx
    finally:
        sync_query_params(ctx)
