from saesteer.ui.frame import page
from saesteer.ui.pages import card

with page() as ctx:
    card.render(ctx)
