"""The one mapping between SAE hook names and HF modules.

``blocks.L.hook_resid_post`` (TransformerLens / sae-lens, what Gemma Scope SAEs read) is the output of HF
decoder layer L, i.e. the first element of ``model.model.layers[L]``'s output tuple. sae-lens SAEs trained
on HF models through ``HookedProxyLM`` name the module directly (``model.layers.L``).
"""

from __future__ import annotations

import re

from torch import nn

from .models import LoadedModel, decoder_layers

_TL = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_HF = re.compile(r"^(?:model\.)?(?:model\.layers|layers|transformer\.h|gpt_neox\.layers)\.(\d+)$")


class HookPointError(ValueError):
    """A hook name that saesteer cannot map to a residual-stream module."""


def hook_layer(hook_name: str) -> int:
    """Layer index L of a residual-stream hook name (either convention)."""
    for pattern in (_TL, _HF):
        m = pattern.match(hook_name)
        if m:
            return int(m.group(1))
    raise HookPointError(
        f"hook {hook_name!r} is not a residual-stream hook: saesteer supports 'blocks.L.hook_resid_post' "
        "and the HF module names 'model.layers.L'"
    )


def tl_hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def hf_module_name(layer: int) -> str:
    return f"model.layers.{layer}"


def resolve_module(lm: LoadedModel, hook_name: str, model: nn.Module | None = None) -> nn.Module:
    """The HF module whose output is the residual stream that ``hook_name`` reads.

    ``model``: the module tree to look in, ``lm.model`` by default; another copy of the same architecture
    (the bf16 fast-decode copy of ``steering.fast_model``) gets its own layer back.
    """
    layer = hook_layer(hook_name)
    if not 0 <= layer < lm.n_layers:
        raise HookPointError(f"hook {hook_name!r} names layer {layer}, but the model has layers 0..{lm.n_layers - 1}")
    return lm.layers[layer] if model is None else decoder_layers(model)[layer]
