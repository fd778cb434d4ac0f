"""Views of a FeatureData that several pages share (pure apart from small per-object caches)."""

from __future__ import annotations

import weakref

import numpy as np
import pandas as pd

from ..models import LoadedModel
from ..saes import LoadedSae

# FeatureData is an unhashable dataclass: per-object caches are keyed by id() and hold a weak reference
# to check that the id still names the same object.
_MAX_TOKENS: dict[int, tuple[weakref.ref, dict[int, list[str]]]] = {}
_LENS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def context_max_tokens(contexts) -> list[str]:
    """The max-activating token of each context."""
    return [c.tokens[c.max_pos] for c in contexts]


def max_tokens_by_feature(data) -> dict[int, list[str]]:
    """Feature -> max-activating token of each of its top contexts, read straight from the context arrays
    (building Context objects for every feature would take seconds); computed once per FeatureData."""
    hit = _MAX_TOKENS.get(id(data))
    if hit is not None and hit[0]() is data:
        return hit[1]
    cached: dict[int, list[str]] = {}
    if data.has_contexts:
        n, slots = data.ctx_pos.shape
        ids = data.ctx_tokens[np.arange(n)[:, None], np.arange(slots)[None, :], data.ctx_pos.astype(np.int64)]  # (n, slots)
        counts = data.table["n_contexts"].to_numpy()
        for r, f in enumerate(data.features):
            cached[int(f)] = data.token_text(ids[r, : int(counts[r])])
    for key in [k for k, (ref, _) in _MAX_TOKENS.items() if ref() is None]:
        del _MAX_TOKENS[key]
    _MAX_TOKENS[id(data)] = (weakref.ref(data), cached)
    return cached


def lens_frames(data, feature: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(top, bottom) logit-lens tokens of ``feature`` with their logits, as DataFrames (token, logit)."""
    r = data.row(feature)
    return (
        pd.DataFrame({"token": data.top_tokens(feature), "logit": data.lens.top_logits[r].astype(float)}),
        pd.DataFrame({"token": data.bottom_tokens(feature), "logit": data.lens.bottom_logits[r].astype(float)}),
    )


def live_lens_tokens(lm: LoadedModel, sae: LoadedSae, feature: int, k: int = 20) -> list[str]:
    """Top-``k`` logit-lens tokens of one feature, computed now (no feature data needed)."""
    from ..scores import logit_lens

    per_sae = _LENS_CACHE.setdefault(sae.sae, {})
    key = (int(feature), k)
    if key not in per_sae:
        sae.check_feature(int(feature))
        ids = logit_lens(lm, sae, k=k, features=[int(feature)]).top_ids[0]
        per_sae[key] = [lm.tokenizer.decode([int(i)]) for i in ids]
    return per_sae[key]


def card_dict(ctx, data, feature: int) -> dict:
    """Everything the feature card shows, as plain data for the JSON export."""
    row = data.table[data.table["feature"] == feature].iloc[0].to_dict()
    top, bottom = lens_frames(data, feature)
    edges, counts = data.histogram(feature)
    return {
        "model": ctx.model_name,
        "sae": {"id": ctx.sae.id, "layer": ctx.sae.layer, "hook_name": ctx.sae.hook_name, "width": ctx.sae.width},
        "feature": int(feature),
        "scores": row,
        "logit_lens": {"top": top.to_dict(orient="records"), "bottom": bottom.to_dict(orient="records")},
        "output_details": data.output_details(feature).to_dict(orient="records"),
        "contexts": [
            {"tokens": list(c.tokens), "acts": [float(a) for a in c.acts], "max_pos": int(c.max_pos), "activation": float(c.activation)}
            for c in data.contexts(feature)
        ],
        "histogram": {"edges": np.asarray(edges).tolist(), "counts": np.asarray(counts).tolist()},
    }
