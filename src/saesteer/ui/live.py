"""What the live-steering pages (the lab and the duel) share: the selected SAE's feature bank and default
strengths, the line naming the device that decodes, and errors shown on the page instead of raised."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import streamlit as st

from .. import presets as presets_lib
from ..config import ConfigError
from ..memory import describe, free_memory, is_out_of_memory
from .context import AppContext

if TYPE_CHECKING:
    from ..evaluation import FeatureBank


@st.cache_resource(show_spinner=False, max_entries=8)
def _bank(sae_id: str, _data) -> FeatureBank:
    from ..evaluation import FeatureBank

    return FeatureBank.from_feature_data(_data, source=sae_id)


def bank_for(ctx: AppContext) -> FeatureBank:
    """The selected SAE's feature data as the bank candidates are picked from, cached per SAE and data."""
    return _bank(f"{ctx.sae.id}:{id(ctx.data)}", ctx.data)


@st.cache_resource(show_spinner=False, max_entries=16)
def _defaults(key: tuple, _lm, _sae, _bank) -> presets_lib.Defaults:
    return presets_lib.defaults(_lm, _sae, _bank)


def _results_stamp() -> tuple:
    """Changes when an evaluation run is added or rewritten (the defaults then follow it)."""
    from ..evaluation import eval_roots

    metas = [m for root in eval_roots() for m in sorted(root.glob("**/meta.json"))]
    return tuple((str(m), m.stat().st_mtime) for m in metas)


def defaults_for(ctx: AppContext) -> presets_lib.Defaults:
    """The fluent defaults at the selected SAE (:func:`saesteer.presets.defaults`), cached per SAE and results."""
    return _defaults((ctx.sae.id, id(ctx.data), _results_stamp()), ctx.lm, ctx.sae, bank_for(ctx))


def device_line(ctx: AppContext, fast: bool, rows: int = 3) -> str:
    """Which device decodes a batch of ``rows``, and on which path, in one line (the path actually taken:
    ``steering.decoding_model`` keeps batches above ``FAST_MAX_BATCH`` on the exact model)."""
    from ..steering import decoding_model

    dev = ctx.lm.device
    exact = not fast or decoding_model(ctx.lm, rows, fast) is ctx.lm.model
    dtype = str(ctx.lm.dtype).removeprefix("torch.")
    if dev.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(dev)
        path = f"the exact {dtype} model" if exact else "a bf16 copy of the model"
        return f"Running on **{name}** (CUDA): {path}, all {rows} columns in one batch."
    path = f"the exact {dtype} model" if exact else "fast path: a bf16 copy of the model"
    return f"Running on the **CPU** ({path}), all {rows} columns in one batch."


@contextmanager
def shown_errors(what: str, hint: str) -> Iterator[None]:
    """Show bad input and out-of-memory errors raised inside the block as ``st.error`` (the page stays up);
    ``what`` names the work that failed, ``hint`` what to reduce when memory ran out. Other errors propagate."""
    cause = None
    try:
        yield
    except ConfigError as exc:
        st.error(str(exc))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        cause = describe(exc)
    if cause is not None:
        free_memory()  # outside the except block: the traceback, and the tensors its frames hold, are gone
        st.error(f"Out of memory while {what} ({cause}): {hint}.")
