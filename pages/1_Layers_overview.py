from saesteer.ui import overview
from saesteer.ui.context import page

with page() as ctx:
    overview.render(ctx)
