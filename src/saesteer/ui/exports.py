"""Downloadable artefacts as bytes (no Streamlit here): scores CSV, feature card JSON, steering vector.

The steering vector file is safetensors with the direction ``decode(e_f) - decode(0)`` per feature and,
for the additive convention, the summed vector ``Σ coeff_i · direction_i`` that is added at every position.
In paper mode the added vector also depends on the run-time activations (``amp · max_j a_j(x)``), so the
file carries the directions and the amplifications in its metadata instead of one fixed vector.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save

from ..saes import LoadedSae


def scores_csv(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False).encode("utf-8")


def _plain(value):
    """JSON-safe plain Python values (numpy scalars/arrays, NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, pd.DataFrame):
        return _plain(value.to_dict(orient="records"))
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def card_json(card: dict) -> bytes:
    return json.dumps(_plain(card), indent=2, ensure_ascii=False).encode("utf-8")


def steering_vector(sae: LoadedSae, features: Sequence[int], strengths: Sequence[float], mode: str, model_name: str = "") -> bytes:
    """safetensors bytes with ``directions`` (n, d_model), ``features`` (n,), ``strengths`` (n,) and,
    in additive mode, ``vector`` (d_model,) = Σ strength_i · direction_i."""
    if len(features) != len(strengths) or not features:
        raise ValueError("give one strength per feature and at least one feature")
    for f in features:
        sae.check_feature(int(f))
    directions = sae.directions([int(f) for f in features]).detach().float().cpu().contiguous()  # (n, d_model)
    tensors = {
        "directions": directions,
        "features": torch.tensor([int(f) for f in features], dtype=torch.int64),
        "strengths": torch.tensor([float(s) for s in strengths], dtype=torch.float32),
    }
    if mode == "additive":
        tensors["vector"] = (tensors["strengths"][:, None] * directions).sum(0).contiguous()
    convention = (
        "additive: x += vector at every position"
        if mode == "additive"
        else "paper: at each forward, x_last += strength_i * max_j a_j(x_last) * directions[i] (a = SAE activations)"
    )
    metadata = {
        "mode": mode,
        "convention": convention,
        "sae_id": sae.id,
        "hook_name": sae.hook_name,
        "layer": str(sae.layer),
        "model": model_name,
    }
    return save(tensors, metadata=metadata)
