"""The app's pages, one module per key of ``nav.PAGES``; each has ``render(ctx)``. The files under the
repository's ``pages/`` (Streamlit's multipage layout) only wrap these in ``frame.page()``."""
