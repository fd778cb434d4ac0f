"""Greedy fast decoding on a CPU: the argmax over the vocabulary from an int4 screen and exact rescoring.

Batch-1 decode of Gemma 3 270M is bound by reading the 262144 × 640 unembedding (fp32 671 MB, bf16 335 MB
per token). :class:`ScreenedHead` reads a 4-bit copy instead (84 MB: group-wise bf16 scales and zeros, torch's
CPU int4 kernel) to get approximate logits, then computes exact float32 logits ``h · w_v`` for the
``CANDIDATES`` tokens the screen ranks highest and returns the best of those. The chosen token is the exact
float32 argmax whenever that token is among the screen's candidates. That is not proven per step (a
rigorous bound on the int4 error — Σ_g ‖h_g‖·‖w_g − q_g‖ — is ≈ 12 logits wide on this model, far wider
than the gaps between top tokens, so it would certify nothing); it is measured: see
``tests/test_steering.py`` and ``benchmarks/bench_decode.py``, which count agreements with the full float32
head. Used for greedy decoding on the (already approximate, labelled) fast path only; sampling needs every
probability and keeps the model's own head.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

GROUP = 64
CANDIDATES = 64
_PAD = 64  # the int4 kernel packs rows in tiles: pad the vocabulary to a multiple of this


def available(device: torch.device) -> bool:
    """The CPU int4 kernels exist in this torch build (and the model runs on the CPU)."""
    ops = torch.ops.aten
    return device.type == "cpu" and hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


class ScreenedHead:
    """Greedy argmax of ``hidden @ weight.T`` (``weight`` (vocab, d) float32): int4 screen, exact float32 rescoring."""

    def __init__(self, weight: torch.Tensor, candidates: int = CANDIDATES):
        w = weight.detach().float()
        vocab, d = w.shape
        if d % GROUP:
            raise ValueError(f"the model width {d} is not a multiple of the int4 group size {GROUP}")
        self.vocab, self.groups = vocab, d // GROUP
        self.candidates = max(1, min(candidates, vocab))
        self.weight = weight.detach()  # the exact rows (shared with the model, not copied)
        padded = -(-vocab // _PAD) * _PAD
        g = torch.zeros(padded, self.groups, GROUP)
        g[:vocab] = w.view(vocab, self.groups, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        # the kernel dequantises as (q − 8) · scale + zero, with bf16 scale and zero
        scale16 = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
        zero16 = (lo + 8 * scale16.float()).to(torch.bfloat16)
        scale, zero = scale16.float()[..., None], zero16.float()[..., None]
        q = torch.round((g - zero) / scale + 8).clamp(0, 15)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(padded, d).to(torch.int32), 1)
        self.scales_zeros = torch.stack([scale16.T, zero16.T], dim=-1).contiguous()  # (groups, padded, 2)

    def approx(self, hidden: torch.Tensor) -> torch.Tensor:
        """Approximate logits (batch, vocab) from the int4 weights, in float32."""
        hb = hidden.to(torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(hb, self.packed, GROUP, self.scales_zeros)[:, : self.vocab].float()

    @torch.no_grad()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens (batch,) for final-normed hidden states (batch, d), rounded to bf16 first (the
        fast path's hidden states are bf16 already)."""
        h = hidden.to(torch.bfloat16).float()
        approx = self.approx(h)
        cand = approx.topk(self.candidates, dim=-1).indices.sort(dim=-1).values  # ascending ids: ties -> lowest
        exact = torch.einsum("bd,bcd->bc", h, self.weight[cand].float())
        arg = exact.argmax(dim=-1)
        return cand.gather(1, arg[:, None])[:, 0]


EXACT_BLOCK = 2048


def vocab_blocks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: int):
    """(start, logits) of ``hidden @ weight.T + bias`` for consecutive blocks of ``block`` vocabulary rows, in
    the weight's dtype (one block off the CPU): the shared loop of the blocked greedy head and the blocked
    log-sum-exp of ``evaluate.continuation_nll``."""
    vocab = weight.shape[0]
    block = block if hidden.device.type == "cpu" else vocab
    h = hidden.to(weight.dtype)
    for s in range(0, vocab, block):
        logits = h @ weight[s : s + block].T
        yield s, logits if bias is None else logits + bias[s : s + block]


@torch.no_grad()
def exact_argmax(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """The greedy tokens (batch,) of the head ``hidden @ weight.T + bias`` (soft-capped), exactly as the argmax
    of the full logits would pick them (first index on ties, NaN counts as the largest), computed on a CPU in
    blocks of ``EXACT_BLOCK`` vocabulary rows so that the (batch, vocab) logits never exist at once.

    Why: at a batch of a few hundred rows the full product writes and re-reads 0.46 GB of float32 logits per
    step; cache-sized blocks are 1.17–1.28× faster at 10–440 rows (``benchmarks/evaluate.py``, which also
    counts agreement on real hidden states). Tested equal to the full argmax with ties, bias, soft-cap and
    NaN, and in decoding against transformers' own greedy ``generate``. Elsewhere than on a CPU it is one block.
    """
    best_v = best_i = None
    for s, logits in vocab_blocks(hidden, weight, bias, EXACT_BLOCK):
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        i = logits.argmax(dim=-1)
        v = logits.gather(1, i[:, None])[:, 0].float()
        i = i + s
        if best_v is None:
            best_v, best_i = v, i
            continue
        better = (v > best_v) | (v.isnan() & ~best_v.isnan())
        best_v, best_i = torch.where(better, v, best_v), torch.where(better, i, best_i)
    return best_i


_HEADS: weakref.WeakKeyDictionary[nn.Module, ScreenedHead] = weakref.WeakKeyDictionary()
_HEADS_LOCK = threading.Lock()


def screened_head(model: nn.Module, weight: torch.Tensor) -> ScreenedHead:
    """The :class:`ScreenedHead` of ``weight`` (the float32 unembedding of ``model``), built once per model
    (≈ 85 MB for Gemma 3 270M: the int4 copy) and cached weakly by the model."""
    with _HEADS_LOCK:
        head = _HEADS.get(model)
        if head is None:
            head = _HEADS[model] = ScreenedHead(weight)
        return head
