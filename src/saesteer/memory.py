"""Out-of-memory fallback for batched work: halve the batch and retry the same items, down to one item.

A batch that fits on one machine may not fit on another (a smaller GPU, a busy CPU box). The batched paths
(output scores, evaluation generation and perplexity) run their batches through :func:`for_each_batch`, which
catches an out-of-memory error, frees what it can, halves the batch and retries the same items. Results do
not depend on the batch size (each row is computed independently), so a fallback run equals an un-faulted
one. Only when a single item does not fit does it give up, with a message that says what to reduce.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable

import torch

#: What to do when even one item does not fit: the model itself needs less memory, or the device more.
HINT = "free device memory (other jobs or sessions on this device), or load the model with --dtype bfloat16 or on --device cpu"


class OutOfMemory(RuntimeError):
    """Even a batch of one item ran out of memory; the message says what to reduce."""


#: How allocation failures that are plain RuntimeErrors read: MPS / older CUDA, and torch's CPU allocator
#: ("DefaultCPUAllocator: can't allocate memory" / "not enough memory").
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: CUDA/MPS/CPU out of memory, or Python's MemoryError."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):  # torch.cuda.OutOfMemoryError is torch.OutOfMemoryError
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def describe(exc: BaseException) -> str:
    """A one-line cause for messages: the exception's class and the first line of its text (160 characters)."""
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else exc.__class__.__name__


def free_memory() -> None:
    """Drop unreachable tensors and return cached device blocks, so that a smaller batch can be allocated."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def for_each_batch(n: int, batch_size: int, step: Callable[[int, int], None], what: str, hint: str = HINT) -> int:
    """Call ``step(start, stop)`` on consecutive ranges that cover items 0..n-1, at most ``batch_size`` at a time.

    When a step runs out of memory, the batch size is halved (for the rest of the run, with a warning that
    names the smaller size to start from next time) and the same range is retried; ``step`` must therefore
    leave no partial result behind when it raises. ``what`` names the items ("features", "prompts") and
    ``hint`` what the user can do when even one item does not fit, which raises :class:`OutOfMemory`.
    Returns the batch size that worked last.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size, start = batch_size, 0
    while start < n:
        stop = min(start + size, n)
        try:
            step(start, stop)
        except Exception as exc:  # anything but an out-of-memory error is re-raised as is
            if not is_out_of_memory(exc):
                raise
            if stop - start <= 1:
                cause = describe(exc)
                raise OutOfMemory(
                    f"out of memory even at batch size 1 ({what}; the batch was halved from {batch_size} after each failure; {cause}): {hint}"
                ) from exc
            failed, size = stop - start, max(1, (stop - start) // 2)
            warnings.warn(
                f"out of memory with a batch of {failed} {what}; retrying with {size} (a smaller batch size avoids the retries)",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            start = stop
            continue
        free_memory()  # outside the except block: the traceback, and the tensors its frames hold, are gone
    return size
