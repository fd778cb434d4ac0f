"""The only code that touches the residual stream: forward hooks installed by context managers.

Every hook is removed in ``finally``; nothing stays attached to a (shared) model after a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .models import LoadedModel

ResidFn = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early once the last needed layer has run."""


def _unpack(output):
    return output[0] if isinstance(output, tuple) else output


def _repack(output, resid: torch.Tensor):
    return (resid, *output[1:]) if isinstance(output, tuple) else resid


@contextmanager
def residual_edit(module: nn.Module, fn: ResidFn) -> Iterator[None]:
    """Replace ``module``'s residual output x (batch, pos, d_model) by ``fn(x)`` for the duration of the block."""

    def hook(_mod, _inp, output):
        return _repack(output, fn(_unpack(output)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_residuals(lm: LoadedModel, layers: Sequence[int], stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual stream after each of ``layers`` into the yielded dict (layer -> (batch, pos, d_model)).

    With ``stop=True`` the forward raises :class:`StopForward` after the deepest layer; wrap the call in
    ``run_until_stop``.
    """
    store: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []

    def make(layer: int):
        def hook(_mod, _inp, output):
            store[layer] = _unpack(output).detach()
            if stop and layer == last:
                raise StopForward

        return hook

    try:
        for layer in layers:
            handles.append(lm.layers[layer].register_forward_hook(make(layer)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until_stop(fn: Callable[[], object]) -> None:
    try:
        fn()
    except StopForward:
        pass
