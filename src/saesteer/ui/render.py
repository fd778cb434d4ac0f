"""HTML and Markdown rendering of tokens (pure functions, no Streamlit).

Tokens are untrusted text: a vocabulary holds strings like ``<script>`` and a corpus can hold anything.
Every token goes through :func:`saesteer.text.escape` before it is placed in markup; only numbers we
computed ourselves go into attributes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..text import escape, md_escape, visible


def token_html(token: str) -> str:
    """Escaped token in a ``<bdi>``, so that right-to-left tokens do not reorder their neighbours."""
    return "<bdi>" + escape(visible(token)) + "</bdi>"


def md_token(token: str) -> str:
    """A token for ``st.markdown``: HTML-escaped and with Markdown syntax neutralised, shown in quotes."""
    return "“" + md_escape(escape(visible(token))) + "”"


def _alpha(act: float, scale: float) -> float:
    if scale <= 0 or not math.isfinite(act) or act <= 0:
        return 0.0
    return round(min(1.0, act / scale), 3)


def context_html(tokens: Sequence[str], acts: Sequence[float], max_pos: int | None = None, scale: float | None = None) -> str:
    """One context as a line of spans, each token's background proportional to its activation.

    ``scale`` is the activation that maps to full colour (default: this context's maximum); the
    max-activating token is outlined. Hovering a token shows its activation.
    """
    if len(tokens) != len(acts):
        raise ValueError(f"{len(tokens)} tokens but {len(acts)} activations")
    scale = scale if scale is not None else max((a for a in acts if math.isfinite(a)), default=0.0)
    spans = []
    for i, (tok, act) in enumerate(zip(tokens, acts)):
        alpha = _alpha(float(act), float(scale))
        style = f"background-color: rgba(255, 140, 0, {alpha});"
        if i == max_pos:
            style += " outline: 2px solid #c05000; font-weight: 600;"
        spans.append(f'<span class="tok" style="{style}" title="activation {float(act):.3g}">{token_html(tok)}</span>')
    return '<div class="ctx" style="font-family: monospace; white-space: pre-wrap; line-height: 1.9; margin: 0.2em 0;">' + "".join(spans) + "</div>"


def contexts_html(contexts: Sequence, limit: int = 20) -> str:
    """Several contexts (objects with tokens, acts, max_pos, activation), colours on one shared scale."""
    shown = list(contexts)[:limit]
    if not shown:
        return "<p><em>no contexts recorded for this feature</em></p>"
    scale = max(float(c.activation) for c in shown)
    rows = []
    for rank, ctx in enumerate(shown, start=1):
        rows.append(
            f'<div style="display: flex; gap: 0.6em; align-items: baseline;"><span style="color: #888; min-width: 5.5em;">#{rank} · {float(ctx.activation):.3g}</span>'
            + context_html(ctx.tokens, ctx.acts, ctx.max_pos, scale)
            + "</div>"
        )
    return "\n".join(rows)


def token_chips_html(tokens: Sequence[str], values: Sequence[float] | None = None, color: str = "#d62728") -> str:
    """Tokens as small labelled chips (e.g. the logit-lens top tokens with their logits)."""
    chips = []
    for i, tok in enumerate(tokens):
        label = token_html(tok)
        value = f' <span style="opacity: 0.7;">{float(values[i]):.2f}</span>' if values is not None else ""
        chips.append(f'<span style="display: inline-block; border: 1px solid {color}; border-radius: 0.6em; padding: 0 0.45em; margin: 0.12em; font-family: monospace; white-space: pre;">{label}{value}</span>')
    return "".join(chips)
