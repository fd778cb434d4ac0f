from saesteer.ui import duel
from saesteer.ui.context import page

with page() as ctx:
    duel.render(ctx)
