"""Feature scores of Arad, Mueller & Belinkov (2025): logit lens, output score (batched), input score.

Output score of feature f (paper Fig. 1): on the neutral prompt (with BOS), at the SAE layer and the last
position only, add ``amp · max_j a_j(x_last) · d_f`` to the residual stream (``d_f = decode(e_f) − decode(0)``,
i.e. ``W_dec[f]`` for a plain SAE), run the rest of the model and read the next-token distribution p. With T
the feature's top-k logit-lens tokens::

    output_score = (1 − min_{t∈T} rank(t) / |V|) · max_{t∈T} p(t)        rank 0 = most likely

The batched path runs the prompt prefix once (KV cache) and then only the last token, one batch row per
feature; :func:`output_score_reference` is the obvious one-forward-per-feature version it is tested against.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import ScoreParams
from .hookpoints import resolve_module
from .memory import for_each_batch
from .models import LoadedModel
from .saes import LoadedSae
from .steering import capture_residuals, residual_edit, run_until_stop

Progress = Callable[[int, int], None]

#: Ranks below this are read off a top-k of the logits; the best T-token's rank is always exact.
DETAIL_RANK_CAP = 1024
#: Input score: at most this many top contexts per feature are looked at ...
INPUT_MAX_CONTEXTS = 100
#: ... and features with fewer than this many get NaN.
INPUT_MIN_CONTEXTS = 10


@dataclass
class LogitLens:
    """Top and bottom logit-lens tokens of features (rows follow ``features``)."""

    features: np.ndarray  # (n,) int64
    top_ids: np.ndarray  # (n, k) int64, best first
    top_logits: np.ndarray  # (n, k) float32
    bottom_ids: np.ndarray  # (n, k) int64, most negative first
    bottom_logits: np.ndarray  # (n, k) float32

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    def rows(self, features: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row index of each feature id (raises KeyError for features this lens does not cover)."""
        lookup = {int(f): i for i, f in enumerate(self.features)}
        return np.array([lookup[int(f)] for f in features], dtype=np.int64)

    def subset(self, features: Sequence[int] | np.ndarray) -> LogitLens:
        r = self.rows(features)
        return LogitLens(self.features[r], self.top_ids[r], self.top_logits[r], self.bottom_ids[r], self.bottom_logits[r])


@dataclass
class OutputScoreResult:
    """Output scores of ``features``; per-token details are in T order (the logit-lens top-k, best first)."""

    features: np.ndarray  # (n,) int64
    score: np.ndarray  # (n,) float64
    min_rank: np.ndarray  # (n,) int64, exact rank of the best T-token after amplification
    max_prob: np.ndarray  # (n,) float64
    token_ids: np.ndarray  # (n, k) int64, T
    ranks: np.ndarray  # (n, k) int64, exact when < rank_cap, else rank_cap (a lower bound)
    probs: np.ndarray  # (n, k) float64
    added_activation: float  # amp · max_j a_j(x_last), the same for every feature
    vocab_size: int
    rank_cap: int = DETAIL_RANK_CAP


def _all_features(sae: LoadedSae, features: Sequence[int] | np.ndarray | None) -> np.ndarray:
    if features is None:
        return np.arange(sae.width, dtype=np.int64)
    feats = np.asarray(features, dtype=np.int64).reshape(-1)
    for f in feats:
        sae.check_feature(int(f))
    return feats


def prompt_ids(lm: LoadedModel, text: str) -> torch.Tensor:
    """Token ids (1, pos) of ``text`` with exactly one leading BOS, whatever the tokenizer's default."""
    ids = list(lm.tokenizer(text, add_special_tokens=False).input_ids)
    bos = lm.tokenizer.bos_token_id
    if bos is not None:
        ids = [bos, *ids]
    if len(ids) < 2:
        raise ValueError(f"prompt {text!r} has no tokens besides BOS: give a non-empty prompt")
    return torch.tensor([ids], device=lm.device)


# ---------------------------------------------------------------------------------------------------
# Logit lens


@torch.no_grad()
def logit_lens(
    lm: LoadedModel,
    sae: LoadedSae,
    k: int = 20,
    batch: int = 256,
    features: Sequence[int] | np.ndarray | None = None,
    progress: Progress | None = None,
) -> LogitLens:
    """Top/bottom-k tokens of ``unembed(d_f)`` per feature; softmax is monotone, so top-k on logits suffices."""
    feats = _all_features(sae, features)
    k = min(k, lm.vocab_size)
    n = len(feats)
    top_ids = np.empty((n, k), np.int64)
    top_logits = np.empty((n, k), np.float32)
    bot_ids = np.empty((n, k), np.int64)
    bot_logits = np.empty((n, k), np.float32)
    for start in range(0, n, batch):
        chunk = feats[start : start + batch]
        dirs = sae.directions(torch.from_numpy(chunk)).to(lm.device, lm.dtype)  # (b, d_model)
        logits = _wide(lm.unembed(dirs))  # (b, vocab)
        tv, ti = topk_rows(logits, k)
        bv, bi = topk_rows(logits, k, largest=False)
        sl = slice(start, start + len(chunk))
        top_ids[sl], top_logits[sl] = ti.cpu().numpy(), tv.cpu().numpy()
        bot_ids[sl], bot_logits[sl] = bi.cpu().numpy(), bv.cpu().numpy()
        del logits
        if progress:
            progress(min(start + batch, n), n)
    return LogitLens(feats, top_ids, top_logits, bot_ids, bot_logits)


#: Row width of the groups :func:`topk_rows` screens by their maxima.
TOPK_GROUP = 256


def topk_rows(x: torch.Tensor, k: int, largest: bool = True, group: int = TOPK_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=1, largest=largest)`` of a wide (rows, n) matrix, without sorting each whole row: the
    row is cut into groups of ``group`` columns, and the top k lie in the k groups with the largest maxima (a
    group holding a top-k element has a max at least that element; fewer than k groups can have a larger one).
    Exactly the same values in the same order as ``topk``; indices differ only among exactly equal values
    (where ``topk`` itself promises no order). A plain ``topk`` where the shape does not allow the screen."""
    rows, n = x.shape
    if n % group or n < 8 * k * group or x.device.type != "cpu":
        return x.topk(k, dim=1, largest=largest)
    g = x.view(rows, n // group, group)  # (rows, groups, group)
    extreme = g.amax(2) if largest else g.amin(2)  # (rows, groups)
    chosen = extreme.topk(k, dim=1, largest=largest).indices.sort(dim=1).values  # (rows, k), ascending
    cand = g.gather(1, chosen[:, :, None].expand(rows, k, group)).reshape(rows, k * group)
    values, j = cand.topk(k, dim=1, largest=largest)
    return values, chosen.gather(1, j // group) * group + j % group


def count_greater(x: torch.Tensor, threshold: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Per row of x (rows, n): how many entries are strictly greater than ``threshold`` (rows, 1), as int64.

    ``(x > t).sum(1)`` is the obvious form; on a CPU torch sums a boolean matrix ~10x slower than it writes
    the comparison into a float buffer and sums that (exact: counts stay far below 2^24), so that is done here,
    ``block`` rows at a time to bound the buffer."""
    if x.device.type != "cpu":
        return (x > threshold).sum(dim=1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    buf = torch.empty(min(block, x.shape[0]), x.shape[1], dtype=torch.float32)
    for a in range(0, x.shape[0], block):
        b = min(a + block, x.shape[0])
        part = torch.gt(x[a:b], threshold[a:b], out=buf[: b - a])
        out[a:b] = part.sum(dim=1).round().long()
    return out


def token_strings(lm: LoadedModel, ids: Sequence[int] | np.ndarray, mark_spaces: bool = False) -> list[str]:
    """Readable strings of single tokens: newlines and tabs made visible ("↵", "⇥"), partial UTF-8 bytes shown
    by their token name; with ``mark_spaces`` spaces become "␣" (so " Paris" and "Paris" differ in a list)."""
    flat = [int(i) for i in np.asarray(ids).reshape(-1)]
    uniq = sorted(set(flat))
    tok = lm.tokenizer
    texts = tok.batch_decode([[i] for i in uniq]) if uniq else []
    names = tok.convert_ids_to_tokens(uniq) if uniq else []
    rendered = {}
    for i, text, name in zip(uniq, texts, names):
        if text == "" or "\ufffd" in text:
            text = name if name is not None else f"<{i}>"
        text = text.replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")
        if mark_spaces:
            text = text.replace(" ", "␣")
        rendered[i] = text
    return [rendered[i] for i in flat]


# ---------------------------------------------------------------------------------------------------
# Output score


def _sae_dtype(sae: LoadedSae) -> torch.dtype:
    return sae.sae.W_dec.dtype


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 or wider: bf16/fp16 logits are widened, a float64 model keeps its precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@torch.no_grad()
def _last_position_scale(lm: LoadedModel, sae: LoadedSae, ids: torch.Tensor, amp: float) -> float:
    """amp · max_j a_j(x_last): x_last is the unsteered residual at the SAE layer, last prompt position."""
    with lm.lock, capture_residuals(lm, [sae.layer], stop=True) as acts:
        run_until_stop(lambda: _decoder(lm)(input_ids=ids, use_cache=False))
    x_last = acts[sae.layer][:, -1].to(_sae_dtype(sae))  # (1, d_model)
    return float(amp * sae.latent_max(x_last).item())


def _decoder(lm: LoadedModel):
    return lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model.model


def _ranks_and_probs(logits: torch.Tensor, t_ids: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits (b, vocab) and token sets T (b, k): per-token ranks (capped) and probabilities, and the exact
    rank of each row's best T-token (number of logits strictly greater than it)."""
    t_logits = logits.gather(1, t_ids)  # (b, k)
    lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (b, 1)
    probs = (t_logits - lse).exp()
    cap = min(cap, logits.shape[1])
    best = t_logits.max(dim=1, keepdim=True).values  # (b, 1)
    min_rank = count_greater(logits, best)  # exact rank of the best T-token
    # every T-token ranks at or below the best one: rows whose best is past the cap have all ranks capped, and
    # only the others need the top-cap logits (number of them strictly greater than each T-logit)
    ranks = torch.full_like(t_ids, cap)
    near = (min_rank < cap).nonzero().flatten()
    if len(near):
        top_vals = logits[near].topk(cap, dim=1).values  # (m, cap), descending
        ranks[near] = torch.searchsorted(-top_vals, -t_logits[near].contiguous(), side="left")
    return ranks, probs, min_rank


@torch.no_grad()
def output_scores(
    lm: LoadedModel,
    sae: LoadedSae,
    params: ScoreParams | None = None,
    features: Sequence[int] | np.ndarray | None = None,
    lens: LogitLens | None = None,
    progress: Progress | None = None,
    rank_cap: int = DETAIL_RANK_CAP,
) -> OutputScoreResult:
    """Output scores, batched: the prefix is encoded once into a KV cache, then each forward runs only the last
    prompt token for ``params.batch_size`` features at once (one batch row per feature). Out of memory, the
    batch is halved and retried (see :mod:`saesteer.memory`); the scores do not depend on the batch size."""
    params = params or ScoreParams()
    feats = _all_features(sae, features)
    if lens is None:
        lens = logit_lens(lm, sae, k=params.top_k, features=feats)
    elif lens.k < params.top_k:
        raise ValueError(f"the logit lens has k={lens.k} tokens per feature, the score needs top_k={params.top_k}")
    t_all = lens.top_ids[lens.rows(feats), : params.top_k]  # (n, k)
    ids = prompt_ids(lm, params.prompt)
    scale = _last_position_scale(lm, sae, ids, params.amp)
    module = resolve_module(lm, sae.hook_name)
    n, k = len(feats), t_all.shape[1]
    out_rank = np.empty((n, k), np.int64)
    out_prob = np.empty((n, k), np.float64)
    min_rank = np.empty(n, np.int64)
    with lm.lock:
        prefix = _decoder(lm)(input_ids=ids[:, :-1], use_cache=True).cache
        last = ids[:, -1:]
        add = torch.empty(0)

        def edit(x: torch.Tensor) -> torch.Tensor:  # x: (b, 1, d_model), the last prompt position only
            return x + add[:, None, :]

        def step(start: int, stop: int) -> None:
            nonlocal add
            chunk = feats[start:stop]
            b = len(chunk)
            add = sae.directions(torch.from_numpy(chunk), scale).to(lm.device, lm.dtype)  # (b, d_model)
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(b)
            logits = lm.model(input_ids=last.expand(b, 1), cache=cache, use_cache=True).logits
            logits = _wide(logits[:, -1])  # (b, vocab)
            t_ids = torch.from_numpy(t_all[start:stop]).to(lm.device)
            ranks, probs, mins = _ranks_and_probs(logits, t_ids, rank_cap)
            sl = slice(start, stop)
            out_rank[sl], out_prob[sl], min_rank[sl] = ranks.cpu().numpy(), probs.cpu().numpy(), mins.cpu().numpy()
            del logits, cache
            if progress:
                progress(stop, n)

        with residual_edit(module, edit):
            for_each_batch(n, params.batch_size, step, "features")
    vocab = lm.vocab_size
    max_prob = out_prob.max(axis=1).astype(np.float64)
    score = (1.0 - min_rank / vocab) * max_prob
    return OutputScoreResult(feats, score, min_rank, max_prob, t_all.copy(), out_rank, out_prob, scale, vocab, rank_cap)


@dataclass
class ReferenceScore:
    """One feature's output score from the one-forward reference."""

    score: float
    min_rank: int
    max_prob: float
    token_ids: np.ndarray  # (k,)
    ranks: np.ndarray  # (k,) exact
    probs: np.ndarray  # (k,)


@torch.no_grad()
def output_score_reference(lm: LoadedModel, sae: LoadedSae, feature: int, params: ScoreParams | None = None) -> ReferenceScore:
    """The slow, obvious output score: one full forward of the prompt per feature, the SAE applied inside the
    hook as in the paper (``x' = decode(a + c·e_f) + (x − decode(a))``), a full softmax, ranks by counting."""
    params = params or ScoreParams()
    sae.check_feature(feature)
    s = sae.sae
    dtype = _sae_dtype(sae)
    direction = sae.directions([feature])[0].to(lm.device, lm.dtype)
    lens_logits = _wide(lm.unembed(direction[None])[0])
    t_ids = torch.softmax(lens_logits, dim=-1).topk(min(params.top_k, lm.vocab_size)).indices  # (k,)
    ids = prompt_ids(lm, params.prompt)

    def edit(x: torch.Tensor) -> torch.Tensor:  # (1, pos, d_model)
        x = x.clone()
        x_last = x[:, -1].to(dtype)
        a = s.encode(x_last)
        amplified = a.clone()
        amplified[:, feature] += params.amp * a.max()
        x[:, -1] = (s.decode(amplified) + (x_last - s.decode(a))).to(x.dtype)
        return x

    with lm.lock, residual_edit(resolve_module(lm, sae.hook_name), edit):
        logits = _wide(lm.model(input_ids=ids).logits[0, -1])  # (vocab,)
    p = torch.softmax(logits, dim=-1)
    ranks = torch.stack([(logits > logits[t]).sum() for t in t_ids])
    min_rank = int(ranks.min())
    max_prob = float(p[t_ids].max())
    score = (1.0 - min_rank / lm.vocab_size) * max_prob
    return ReferenceScore(score, min_rank, max_prob, t_ids.cpu().numpy(), ranks.cpu().numpy(), p[t_ids].cpu().numpy())


# ---------------------------------------------------------------------------------------------------
# Input score


def input_scores(
    max_token_ids: np.ndarray,
    n_contexts: np.ndarray,
    lens: LogitLens,
    top_k: int | None = None,
    max_contexts: int = INPUT_MAX_CONTEXTS,
    min_contexts: int = INPUT_MIN_CONTEXTS,
) -> np.ndarray:
    """Share of each feature's top contexts (best first, at most ``max_contexts``) whose max-activating token is
    one of its top-k logit-lens tokens; NaN for features with fewer than ``min_contexts`` contexts.

    ``max_token_ids`` (n, N) holds the token at the max of each context, rows in ``lens.features`` order;
    ``n_contexts`` (n,) how many of the N slots are filled.
    """
    k = lens.k if top_k is None else min(top_k, lens.k)
    slots = max_token_ids.shape[1]
    take = min(max_contexts, slots)
    used = np.minimum(n_contexts, take)  # (n,)
    toks = max_token_ids[:, :take]
    hits = (toks[:, :, None] == lens.top_ids[:, None, :k]).any(axis=2)  # (n, take)
    hits &= np.arange(take)[None, :] < used[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = hits.sum(axis=1) / used
    share = share.astype(np.float64)
    share[used < min_contexts] = math.nan
    return share
