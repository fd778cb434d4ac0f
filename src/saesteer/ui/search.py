"""Concept search (the paper's Figure 1 workflow): which features are *about* a concept, ranked by effect.

A feature matches a concept when its logit-lens top tokens contain one of the concept's tokens, and/or
when the max-activating tokens of its top contexts do. Matches are ranked by output score (does
amplifying the feature actually make the model say the concept?) with the input score beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from ..text import join_tokens, split_tokens
from .tables import norm_token

MIN_PIECE_CHARS = 3


@dataclass(frozen=True)
class ConceptTokens:
    """The spellings of a concept that count as a match."""

    whole: frozenset[str]
    """Normalised single-token spellings of the whole concept (any case, with or without leading space)."""
    pieces: frozenset[str]
    """Normalised pieces of multi-token spellings, at least MIN_PIECE_CHARS long."""

    @property
    def all(self) -> frozenset[str]:
        return self.whole | self.pieces


def case_variants(concept: str) -> list[str]:
    concept = concept.strip()
    out = []
    for v in (concept, concept.lower(), concept.capitalize(), concept.title(), concept.upper()):
        if v and v not in out:
            out.append(v)
    return out


def concept_tokens(concept: str, tokenizer) -> ConceptTokens:
    """Tokenise the concept with and without a leading space, in its case variants."""
    concept = concept.strip()
    if not concept:
        raise ValueError("the concept is empty: type a word such as 'apple' or 'France'")
    whole = {norm_token(concept)}
    pieces: set[str] = set()
    for variant in case_variants(concept):
        for text in (variant, " " + variant):
            ids = tokenizer.encode(text, add_special_tokens=False)
            decoded = [tokenizer.decode([i]) for i in ids]
            if len(decoded) == 1:
                whole.add(norm_token(decoded[0]))
            else:
                pieces.update(p for p in map(norm_token, decoded) if len(p) >= MIN_PIECE_CHARS)
    whole.discard("")
    return ConceptTokens(frozenset(whole), frozenset(pieces - whole))


def _matches(tokens: Iterable[str], targets: frozenset[str]) -> list[str]:
    return [t for t in tokens if norm_token(t) in targets]


def search_concept(
    table: pd.DataFrame,
    targets: ConceptTokens,
    max_tokens: Callable[[int], Sequence[str]] | None = None,
    use_pieces: bool = False,
) -> pd.DataFrame:
    """Features matching ``targets``, ranked by output score.

    Columns: feature, output_score, input_score, lens_matches (matching logit-lens top tokens, " | "-joined),
    lens_hits, context_share (share of top contexts whose max token matches; NaN when not searched),
    top_tokens. ``max_tokens(feature)`` gives the max-activating token of each top context; without it
    only the logit lens is searched.
    """
    wanted = targets.all if use_pieces else targets.whole
    rows = []
    for rec in table[["feature", "output_score", "input_score", "top_tokens"]].itertuples(index=False):
        lens = _matches(split_tokens(rec.top_tokens), wanted)
        share = float("nan")
        if max_tokens is not None:
            ctx = list(max_tokens(int(rec.feature)))
            share = len(_matches(ctx, wanted)) / len(ctx) if ctx else 0.0
        if lens or (share == share and share > 0):
            rows.append(
                {
                    "feature": int(rec.feature),
                    "output_score": rec.output_score,
                    "input_score": rec.input_score,
                    "lens_matches": join_tokens(lens),
                    "lens_hits": len(lens),
                    "context_share": share,
                    "top_tokens": rec.top_tokens,
                }
            )
    columns = ["feature", "output_score", "input_score", "lens_matches", "lens_hits", "context_share", "top_tokens"]
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values(["output_score", "feature"], ascending=[False, True], na_position="last", kind="stable").reset_index(drop=True)
