from saesteer.ui import ranking
from saesteer.ui.context import page

with page() as ctx:
    ranking.render(ctx)
