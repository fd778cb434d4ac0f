"""Measures for the steering lab and its strength sweep, taken from :mod:`saesteer.evaluation.metrics` so that the
app and the evaluation count the same way.

Concept hits are the paper's generation success: how many of a feature's logit-lens top tokens occur in
the generated text as whole words. Fluency is the perplexity of the continuation under the *unsteered*
model (high = the steered text reads as garbage to the model itself) and the share of repeated bigrams.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd

from ..evaluation import continuation_nll, repetition, success_at_k, target_strings
from ..models import LoadedModel


def concept_targets(tokens: Iterable[str]) -> list[str]:
    """Logit-lens tokens usable as concept markers (normalised, alphanumeric, at least two characters)."""
    return target_strings(t.replace("▁", " ") for t in tokens)


def concept_hits(text: str, targets: Sequence[str]) -> int:
    return success_at_k(text, targets)


def score_texts(lm: LoadedModel, prompt: str, texts: Sequence[str], targets: Sequence[str]) -> pd.DataFrame:
    """Concept hits, perplexity under the unsteered model and bigram repetition of each continuation."""
    nll, _ = continuation_nll(lm, [prompt] * len(texts), list(texts))
    return pd.DataFrame(
        {
            "concept_hits": [concept_hits(t, targets) for t in texts],
            "perplexity": [math.exp(v) if v == v else float("nan") for v in nll],
            "repetition": [repetition(t) for t in texts],
        }
    )
