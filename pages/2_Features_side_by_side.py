from saesteer.ui.frame import page
from saesteer.ui.pages import features

with page() as ctx:
    features.render(ctx)
