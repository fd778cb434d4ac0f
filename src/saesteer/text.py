"""Untrusted text on its way to a screen: the one HTML escaper, whitespace made visible, Markdown syntax
neutralised, the ``" | "``-joined token cells of a scores table, and the whole-word match that counts a word
in generated text.

Tokens are untrusted: a vocabulary holds strings like ``<script>`` and a corpus can hold anything. Every
token, context or prompt placed into HTML (Streamlit markdown, plotly labels, the evaluation report) goes
through :func:`escape` first.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable

#: Joins a feature's tokens in one table cell (``top_tokens``, ``bottom_tokens``, ``lens_matches``).
TOKEN_SEP = " | "

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>$<])")


def escape(text: object, whitespace: bool = False) -> str:
    """HTML-escaped text, quotes included (safe in element content and in quoted attributes); with
    ``whitespace``, newlines and tabs are made visible too (for labels that cannot wrap, such as plotly's)."""
    out = html.escape(str(text), quote=True)
    return show_whitespace(out) if whitespace else out


def show_whitespace(text: str) -> str:
    """Newline shown as ⏎ and tab as ⇥, so that a token made of whitespace can be seen."""
    return text.replace("\n", "⏎").replace("\t", "⇥")


def visible(token: str) -> str:
    """A token for display: whitespace made visible and SentencePiece's '▁' shown as a space."""
    return show_whitespace(token.replace("▁", " "))


def md_escape(text: str) -> str:
    """Markdown syntax neutralised with backslashes (apply to text that is already HTML-escaped)."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def whole_word(word: str) -> re.Pattern:
    """``word`` lower-cased, matched only as a whole word (no word character on either side); search it in
    lower-cased text for a case-insensitive match."""
    return re.compile(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)")


def join_tokens(tokens: Iterable[str]) -> str:
    return TOKEN_SEP.join(tokens)


def split_tokens(joined: object) -> list[str]:
    """The tokens of a joined table cell (an empty or missing cell -> [])."""
    if joined is None or (isinstance(joined, float) and math.isnan(joined)):
        return []
    return [t for t in str(joined).split(TOKEN_SEP) if t != ""]
