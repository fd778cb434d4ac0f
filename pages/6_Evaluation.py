from saesteer.ui import evaluation
from saesteer.ui.context import page

with page() as ctx:
    evaluation.render(ctx)
