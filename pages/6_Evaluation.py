from saesteer.ui.frame import page
from saesteer.ui.pages import evaluation

with page() as ctx:
    evaluation.render(ctx)
