from saesteer.ui.frame import page
from saesteer.ui.pages import concepts

with page() as ctx:
    concepts.render(ctx)
