"""What the live-steering pages (the lab and the duel) share: the selected SAE's feature bank and default
strengths, the key that names the selected SAE in their results, the line naming the device that decodes,
and errors shown on the page instead of raised."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import streamlit as st

from .. import presets as presets_lib
from ..config import ConfigError
from ..memory import describe, free_memory, is_out_of_memory
from .context import AppContext
from .loaders import data_key, weights_fingerprint

if TYPE_CHECKING:
    from ..evaluation import FeatureBank


def sae_key(ctx: AppContext) -> str:
    """The selected SAE as the pages' results and caches name it: model, SAE id and weights fingerprint."""
    return f"{ctx.model_name}|{ctx.sae.id}|{weights_fingerprint(ctx.sae)}"


def forget_other_sae(ctx: AppContext, page: str, keys: Sequence[str]) -> str:
    """Drop the session-state ``keys`` (``page``'s results) when the selected SAE is not the one they were made
    with, so that no page shows another layer's texts under this one's features; returns :func:`sae_key`."""
    key = sae_key(ctx)
    mark = f"_{page}_results_sae"
    if st.session_state.get(mark) != key:
        for k in keys:
            st.session_state.pop(k, None)
        st.session_state[mark] = key
    return key


@st.cache_resource(show_spinner=False, max_entries=8)
def _bank(key: tuple, _data) -> FeatureBank:
    from ..evaluation import FeatureBank

    return FeatureBank.from_feature_data(_data, source=key[0])


def bank_for(ctx: AppContext) -> FeatureBank:
    """The selected SAE's feature data as the bank candidates are picked from, cached per SAE and data content."""
    return _bank((sae_key(ctx), data_key(ctx.data)), ctx.data)


@st.cache_resource(show_spinner=False, max_entries=16)
def _defaults(key: tuple, _lm, _sae, _bank) -> presets_lib.Defaults:
    return presets_lib.defaults(_lm, _sae, _bank)


STAMP_SECONDS = 5
"""How long one look at the evaluation runs' files serves the reruns (every slider move is one)."""


@st.cache_data(ttl=STAMP_SECONDS, show_spinner=False)
def results_stamp() -> tuple:
    """Changes when an evaluation run is added or rewritten (the defaults then follow it): the mtimes of the
    run folders' meta.json that :func:`saesteer.presets.find_run` reads, looked at once per ``STAMP_SECONDS``."""
    out = []
    for m in presets_lib.run_metas():
        try:
            out.append((str(m), m.stat().st_mtime_ns))
        except OSError:  # removed since it was listed
            continue
    return tuple(out)


def defaults_for(ctx: AppContext) -> presets_lib.Defaults:
    """The fluent defaults at the selected SAE (:func:`saesteer.presets.defaults`), cached per SAE, data and results."""
    return _defaults((sae_key(ctx), data_key(ctx.data), results_stamp()), ctx.lm, ctx.sae, bank_for(ctx))


def device_line(ctx: AppContext, fast: bool, rows: int = 3) -> str:
    """Which device decodes a batch of ``rows``, and on which path, in one line (the path a decode takes:
    ``steering.uses_fast_model``, decided without building the bf16 copy)."""
    from ..steering import uses_fast_model

    dev = ctx.lm.device
    exact = not uses_fast_model(ctx.lm, rows, fast)
    dtype = str(ctx.lm.dtype).removeprefix("torch.")
    if dev.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(dev)
        path = f"the exact {dtype} model" if exact else "a bf16 copy of the model"
        return f"Running on **{name}** (CUDA): {path}, all {rows} columns in one batch."
    path = f"the exact {dtype} model" if exact else "fast path: a bf16 copy of the model"
    return f"Running on the **CPU** ({path}), all {rows} columns in one batch."


CALIBRATION_OOM = ("other sessions and jobs on this device share its memory: try again, or load the model on the cpu "
                   "(sidebar: Device and precision)")


def strength_or_fallback(find: Callable[[], float], what: str = "finding a fluent strength") -> tuple[float, bool]:
    """(``find()``, True) (a calibration), or (``presets.FALLBACK_STRENGTH``, False) when it fails with bad input
    or out of memory: the error is shown (:func:`shown_errors`) with the fallback named; the page stays up."""
    amp = None
    with shown_errors(what, CALIBRATION_OOM):
        amp = float(find())
    if amp is None:
        st.warning(f"Using amp {presets_lib.FALLBACK_STRENGTH:g} instead (the paper's median best factor): no fluent strength was measured.")
        return presets_lib.FALLBACK_STRENGTH, False
    return amp, True


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
