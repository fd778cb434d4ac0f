"""saesteer dashboard: ``streamlit run app.py``. This file is the start page; the others are in ``pages/``
(Streamlit's multipage layout). Every page renders the same sidebar through ``saesteer.ui.frame.page``;
the pages' code is in ``saesteer.ui.pages``, one module per key of ``saesteer.ui.nav.PAGES``."""

from saesteer.ui.frame import page
from saesteer.ui.pages import home

with page() as ctx:
    home.render(ctx)
