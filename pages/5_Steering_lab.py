from saesteer.ui.frame import page
from saesteer.ui.pages import lab

with page() as ctx:
    lab.render(ctx)
