from saesteer.ui import card
from saesteer.ui.context import page

with page() as ctx:
    card.render(ctx)
