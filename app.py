"""saesteer dashboard: ``streamlit run app.py``. This file is the start page; the others are in ``pages/``
(Streamlit's multipage layout). Every page renders the same sidebar through ``saesteer.ui.context.page``."""

from saesteer.ui import home
from saesteer.ui.context import page

with page() as ctx:
    home.render(ctx)
