from saesteer.ui import concepts
from saesteer.ui.context import page

with page() as ctx:
    concepts.render(ctx)
