"""Feature data for the tiny test fixture (``SAESTEER_TEST_FIXTURE=tiny``): computed by the real pipeline
on the tiny random model over random word sequences, plus one planted context of HTML-like tokens so that
the browser test can check that the app shows such tokens literally. Test data only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import fields

from ..config import ScoreParams
from ..features import Context, FeatureData

XSS_TOKENS = ("<script>alert(1)</script>", " and ", "<img src=x onerror=alert(1)>", " done")


class PlantedFeatureData(FeatureData):
    """The real FeatureData (same class behaviour: an unhashable dataclass) whose ``contexts(feature)``
    starts with one planted context for ``planted_feature`` (test fixture only)."""

    planted_feature: int = -1

    def contexts(self, feature: int, limit: int | None = None) -> list[Context]:
        found = super().contexts(feature, limit)
        if int(feature) != self.planted_feature:
            return found
        top = max((c.activation for c in found), default=1.0)
        planted = Context(list(XSS_TOKENS), [-1] * len(XSS_TOKENS), [0.5 * top, 0.0, top, 0.1 * top], 2, top, -1)
        return [planted, *found]


def with_planted_context(data: FeatureData, feature: int) -> PlantedFeatureData:
    out = PlantedFeatureData(**{f.name: getattr(data, f.name) for f in fields(FeatureData) if f.init and not f.name.startswith("_")})
    out.planted_feature = int(feature)
    return out


def word_sequences(tokenizer, words: Sequence[str], n: int = 96, length: int = 24, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [tokenizer(" ".join(rng.choice(words) for _ in range(length)))["input_ids"] for _ in range(n)]


def tiny_feature_data(lm, sae, words: Sequence[str]):
    from ..features import compute_many

    data = compute_many(lm, [sae], word_sequences(lm.tokenizer, words), ScoreParams(batch_size=64), n_tokens=None, cache=False, use_bundled=False)[0]
    best = int(data.table.sort_values("output_score", ascending=False)["feature"].iloc[0])
    return with_planted_context(data, best)
