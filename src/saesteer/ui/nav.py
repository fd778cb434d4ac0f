"""The app's pages (one registry for ``app.py`` and for in-app links) and moving between them."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st
from streamlit.errors import StreamlitAPIException


@dataclass(frozen=True)
class PageInfo:
    path: str
    """Relative to the entry point ``app.py``; Streamlit names a page after its file (number prefix dropped)."""
    title: str
    icon: str


PAGES = {
    "home": PageInfo("app.py", "Start", ":material/home:"),
    "duel": PageInfo("pages/0_Concept_duel.py", "Concept duel", ":material/swords:"),
    "layers": PageInfo("pages/1_Layers_overview.py", "Layers overview", ":material/bar_chart:"),
    "features": PageInfo("pages/2_Features_side_by_side.py", "Features side by side", ":material/view_column:"),
    "card": PageInfo("pages/3_Feature_card.py", "Feature card", ":material/article:"),
    "concepts": PageInfo("pages/4_Concept_search.py", "Concept search", ":material/search:"),
    "lab": PageInfo("pages/5_Steering_lab.py", "Steering lab", ":material/tune:"),
    "evaluation": PageInfo("pages/6_Evaluation.py", "Evaluation", ":material/fact_check:"),
}


def goto(page: str) -> None:
    """Switch to ``page`` (a key of PAGES). Where the page is unknown to Streamlit (a page file run as the
    entry point), show a pointer instead."""
    info = PAGES[page]
    try:
        st.switch_page(info.path)
    except StreamlitAPIException:
        st.info(f"Open the **{info.title}** page to continue.")


def link(page: str, label: str | None = None) -> None:
    info = PAGES[page]
    try:
        st.page_link(info.path, label=label or info.title, icon=info.icon)
    except (StreamlitAPIException, KeyError):
        st.caption(f"→ {label or info.title}")


def sidebar_links() -> None:
    """The page list with titles and icons, for deployments that hide Streamlit's file-named navigation
    (``client.showSidebarNavigation = false``)."""
    if st.get_option("client.showSidebarNavigation") is False:
        for key in PAGES:
            link(key)
