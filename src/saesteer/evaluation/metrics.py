"""Metrics of one generation, shared by both experiments and by the steering lab's sweep, and the AxBench
strength choice (see :mod:`saesteer.evaluation.concept_level` for how the concept level combines them)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..baselines import mention_pattern
from ..config import ConfigError
from ..memory import for_each_batch
from ..models import LoadedModel
from ..text import whole_word

#: Standard errors on each side of an estimate that make its 95% interval (normal approximation): the
#: headlines of both experiments call a difference real only outside it.
Z95 = 1.96

METRICS = ("concept_score", "mentions", "success_k", "fluency", "ppl", "repetition", "combined")


def split_prefixes(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of prefix indices 0..n-1 into (train, test): floor(n/2) and ceil(n/2) indices, sorted."""
    if n < 2:
        raise ConfigError(f"need at least 2 prefixes to split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return sorted(int(i) for i in perm[:half]), sorted(int(i) for i in perm[half:])


def best_strength(frame: pd.DataFrame, metric: str = "combined") -> float:
    """The strength with the highest mean ``metric`` (NaN rows ignored); ties go to the smallest |strength|,
    then the smaller value. ``frame`` has columns strength and ``metric``."""
    if frame.empty:
        raise ValueError("no rows to choose a strength from")
    means = frame.groupby("strength")[metric].mean()
    if means.isna().all():
        return float(min(means.index, key=lambda s: (abs(s), s)))
    top = means.max()
    ties = [s for s, v in means.items() if v >= top - 1e-12]
    return float(min(ties, key=lambda s: (abs(s), s)))


def normalise_token(text: str) -> str:
    return text.strip().lower()


def target_strings(strings: Iterable[str]) -> list[str]:
    """Distinct normalised strings kept as success@k targets (see the module docstring)."""
    out = {normalise_token(s) for s in strings}
    return sorted(s for s in out if len(s) >= 2 and any(ch.isalnum() for ch in s))


def success_at_k(text: str, targets: Sequence[str]) -> int:
    """How many of ``targets`` (normalised strings) occur in ``text`` as whole words, case-insensitively."""
    low = text.lower()
    return sum(1 for t in targets if whole_word(t).search(low))


def concept_mentions(text: str, concept: str) -> int:
    return len(mention_pattern(concept).findall(text))


def repetition(text: str, n: int = 2) -> float:
    """Share of repeated word n-grams: 1 − distinct/total; 0 when the text has fewer than n words."""
    words = re.findall(r"\w+", text.lower())
    grams = list(zip(*(words[i:] for i in range(n))))
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def ppl_factor(ppl: float, ppl_ref: float, ppl_max: float = 1000.0) -> float:
    """1 at or below ``ppl_ref``, linear in log-perplexity down to 0 at ``ppl_max``; 0 for NaN (empty text)."""
    if not math.isfinite(ppl):
        return 0.0
    if ppl_ref >= ppl_max:
        return 1.0 if ppl <= ppl_ref else 0.0
    return float(np.clip((math.log(ppl_max) - math.log(ppl)) / (math.log(ppl_max) - math.log(ppl_ref)), 0.0, 1.0))


def fluency(rep: float, pf: float) -> float:
    return (1.0 - rep) * pf


VOCAB_BLOCK = 2048


def _target_logprobs(lm: LoadedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) (positions,) in float32 under the head of ``lm`` for final-normed ``hidden`` (positions, d).

    On a CPU the vocabulary is taken in blocks of ``VOCAB_BLOCK`` rows with a running log-sum-exp, so that the
    (positions, vocab) logits never exist at once: cache-sized blocks make the pass ≈ 1.2× faster than one
    product writing 0.5 GB of logits (the tests compare it with a full log-softmax in float64).
    """
    from ..fasthead import vocab_blocks

    run_max = torch.full((len(hidden),), -math.inf, device=hidden.device)
    run_sum = torch.zeros(len(hidden), device=hidden.device)
    picked = torch.empty(len(hidden), device=hidden.device)
    for b, logits in vocab_blocks(hidden, lm.lm_head.weight, getattr(lm.lm_head, "bias", None), VOCAB_BLOCK):
        logits = logits.float()
        if lm.softcap:
            logits = torch.tanh(logits / lm.softcap) * lm.softcap
        new_max = torch.maximum(run_max, logits.amax(-1))
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(-1)
        run_max = new_max
        here = (targets >= b) & (targets < b + logits.shape[1])
        if bool(here.any()):
            rows = here.nonzero()[:, 0]
            picked[rows] = logits[rows, targets[rows] - b]
    return picked - (run_max + torch.log(run_sum))


@torch.no_grad()
def continuation_nll(lm: LoadedModel, prefixes: Sequence[str], continuations: Sequence[str], batch_size: int = 64, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean negative log-likelihood per continuation token under the unsteered model, given the prefix (with the
    tokenizer's BOS), and the number of continuation tokens; NaN where the continuation is empty.

    One right-padded forward per batch; the unembedding runs only at the positions that predict
    continuation tokens (the decoder's last hidden state is already final-normed). Out of memory, the batch
    is halved and retried.
    """
    tok = lm.tokenizer
    rows = [(list(tok(p).input_ids), list(tok(c, add_special_tokens=False).input_ids) if c else []) for p, c in zip(prefixes, continuations)]
    nll = np.full(len(rows), np.nan)
    count = np.array([len(c) for _, c in rows], dtype=np.int64)
    todo = sorted((i for i in range(len(rows)) if count[i] > 0), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    decoder = lm.model.get_decoder()

    def step(start: int, stop: int) -> None:
        idx = todo[start:stop]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        b_idx, p_idx, targets = [], [], []
        for r, (i, s) in enumerate(zip(idx, seqs)):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            n_pre, n_cont = len(rows[i][0]), len(rows[i][1])
            b_idx += [r] * n_cont
            p_idx += list(range(n_pre - 1, n_pre + n_cont - 1))
            targets += rows[i][1]
        with lm.lock:
            hidden = decoder(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).last_hidden_state
        h = hidden[torch.tensor(b_idx), torch.tensor(p_idx)]  # (tokens, d_model)
        tgt = torch.tensor(targets, device=lm.device)
        logp = torch.empty(len(targets), dtype=torch.float64)
        for s in range(0, len(targets), chunk):
            logp[s : s + chunk] = _target_logprobs(lm, h[s : s + chunk], tgt[s : s + chunk]).double().cpu()
        per_row = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, torch.tensor(b_idx), logp)
        for r, i in enumerate(idx):
            nll[i] = -float(per_row[r]) / count[i]

    for_each_batch(len(todo), batch_size, step, "texts")
    return nll, count
