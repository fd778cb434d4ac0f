from saesteer.ui.frame import page
from saesteer.ui.pages import layers

with page() as ctx:
    layers.render(ctx)
