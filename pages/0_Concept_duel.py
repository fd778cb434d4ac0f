from saesteer.ui.frame import page
from saesteer.ui.pages import duel

with page() as ctx:
    duel.render(ctx)
