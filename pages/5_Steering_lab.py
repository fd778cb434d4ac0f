from saesteer.ui import lab
from saesteer.ui.context import page

with page() as ctx:
    lab.render(ctx)
