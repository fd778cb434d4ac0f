"""One streaming pass over a corpus: per-feature density, max activation, histogram and top activating contexts.

Several SAEs of one model are served by one forward per batch (all their layers captured at once, the forward
stopped after the deepest). Memory is bounded by the SAE widths, never by the corpus: each batch's per-sequence
maxima are merged into a running (d_sae, N) top-N buffer that also keeps a short token window around each max.

A *context* is one sequence: its activation is the feature's maximum over the sequence's tokens, and it is
shown as a window of ``window`` tokens that ends ``after`` tokens past the max-activating token. BOS (and
padding) positions are excluded everywhere: they neither count towards density nor become contexts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .models import LoadedModel
from .saes import LoadedSae
from .steering import capture_residuals, run_until_stop

Progress = Callable[[int, int | None], None]

#: Histogram bin edges: 10 log-spaced bins per decade from 1e-2 to 1e4; activations outside fall in the end bins.
HIST_EDGES = np.logspace(-2, 4, 61)
TOP_N = 100
WINDOW = 24
AFTER = 4


@dataclass
class ActivationStats:
    """Statistics of one SAE over ``n_tokens`` corpus tokens (BOS excluded). Context arrays are best first;
    empty slots have activation 0, sequence -1 and tokens -1."""

    sae_id: str
    layer: int
    n_tokens: int
    n_sequences: int
    fire_count: np.ndarray  # (d_sae,) int64, tokens with activation > 0
    max_activation: np.ndarray  # (d_sae,) float32
    hist_edges: np.ndarray  # (n_bins + 1,)
    hist_counts: np.ndarray  # (d_sae, n_bins) int64, over tokens with activation > 0
    top_acts: np.ndarray  # (d_sae, N) float32, the context's max activation
    top_seq: np.ndarray  # (d_sae, N) int64, index of the sequence in the pass
    top_pos: np.ndarray  # (d_sae, N) int32, position of the max-activating token in its sequence
    top_token: np.ndarray  # (d_sae, N) int32, the max-activating token
    win_start: np.ndarray  # (d_sae, N) int32, sequence position of the window's first token
    win_tokens: np.ndarray  # (d_sae, N, W) int32, -1 outside the sequence and at BOS/padding
    win_acts: np.ndarray  # (d_sae, N, W) float32

    @property
    def width(self) -> int:
        return int(self.fire_count.shape[0])

    @property
    def density(self) -> np.ndarray:
        return self.fire_count / max(self.n_tokens, 1)

    @property
    def n_contexts(self) -> np.ndarray:
        return (self.top_seq >= 0).sum(axis=1)


class _Accumulator:
    """Running statistics of one SAE, kept on the model's device.

    The top-N buffer is kept unsorted: a candidate that enters takes the slot of an entry it evicts, so only the
    windows of entering candidates are gathered (after the first batches, few per batch); sorting happens once.
    """

    def __init__(self, d_sae: int, top_n: int, window: int, after: int, device: torch.device):
        if not 0 <= after < window:
            raise ValueError(f"the window must end after the max token: need 0 <= after < window, got {after}, {window}")
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        self.d, self.n, self.w, self.after = d_sae, top_n, window, after
        self.edges = torch.tensor(HIST_EDGES, dtype=torch.float32, device=device)
        nb = len(HIST_EDGES) - 1
        self.n_tokens = 0
        self.n_sequences = 0
        self.fire = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.hist = torch.zeros(d_sae * nb, dtype=torch.int64, device=device)
        self.acts = torch.full((d_sae, top_n), -torch.inf, device=device)
        self.seq = torch.full((d_sae, top_n), -1, dtype=torch.int64, device=device)
        self.pos = torch.zeros((d_sae, top_n), dtype=torch.int64, device=device)
        self.tok = torch.full((d_sae, top_n), -1, dtype=torch.int64, device=device)
        self.start = torch.zeros((d_sae, top_n), dtype=torch.int64, device=device)
        self.win_tok = torch.full((d_sae, top_n, window), -1, dtype=torch.int64, device=device)
        self.win_act = torch.zeros((d_sae, top_n, window), device=device)

    @torch.no_grad()
    def update(self, acts: torch.Tensor, tokens: torch.Tensor, seq_ids: torch.Tensor) -> None:
        """acts (B, P, d_sae), overwritten in place; tokens (B, P) with -1 at excluded positions; seq_ids (B,)."""
        valid = tokens >= 0  # (B, P)
        acts = acts.float()
        acts[~valid] = 0.0  # BOS and padding rows only: cheaper than a pass over everything
        B, P, d = acts.shape
        # SAE activations are sparse: after one pass to find the nonzeros, work on those alone
        flat = acts.view(-1, d)
        tok_idx, feat_idx = flat.nonzero(as_tuple=True)
        vals = flat[tok_idx, feat_idx]
        self._merge(tok_idx, feat_idx, vals, tokens, seq_ids, lambda b, idx, f: acts[b[:, None], idx, f[:, None]])

    @torch.no_grad()
    def update_topk(self, values: torch.Tensor, indices: torch.Tensor, tokens: torch.Tensor, seq_ids: torch.Tensor) -> None:
        """The same as :meth:`update` for a TopK SAE's activations given as the k kept (values, feature indices)
        of each token, both (B, P, k) — the dense (B, P, d_sae) matrix is never built."""
        valid = tokens >= 0
        B, P, k = values.shape
        v = values.reshape(B * P, k).float()
        i = indices.reshape(B * P, k)
        keep = (v > 0) & valid.reshape(-1, 1)
        tok_idx = torch.arange(B * P, device=v.device)[:, None].expand(B * P, k)[keep]
        feat_idx, vals = i[keep], v[keep]
        flat_valid = valid.reshape(-1)

        def window(b: torch.Tensor, idx: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            rows = b[:, None] * P + idx  # (m, W) token rows
            if rows.numel() * k <= B * P * self.d:  # look each (token, feature) up among the token's k entries
                hit = i[rows] == f[:, None, None]  # (m, W, k)
                return (v[rows] * hit).sum(-1) * flat_valid[rows]
            # many entering candidates (the first batches): the dense matrix is the cheaper lookup
            dense = torch.zeros(B * P, self.d, device=v.device).scatter_(1, i, v * flat_valid[:, None])
            return dense[rows, f[:, None]]

        self._merge(tok_idx, feat_idx, vals, tokens, seq_ids, window)

    def _merge(self, tok_idx, feat_idx, vals, tokens, seq_ids, window) -> None:
        """Fold one batch's nonzero activations (flat token row, feature, value) into the running statistics;
        ``window(b, idx, f)`` returns feature f's activations at positions idx (m, W) of batch rows b."""
        valid = tokens >= 0
        B, P = tokens.shape
        d = self.d
        self.n_tokens += int(valid.sum())
        self.n_sequences += B
        pos_mask = vals > 0
        tok_idx, feat_idx, vals = tok_idx[pos_mask], feat_idx[pos_mask], vals[pos_mask]
        self.fire += torch.bincount(feat_idx, minlength=d)
        nb = len(HIST_EDGES) - 1
        bins = torch.bucketize(vals, self.edges[1:-1], right=True)  # 0..nb-1, the end bins take the outliers
        self.hist += torch.bincount(feat_idx * nb + bins, minlength=d * nb)
        # per (sequence, feature): the max activation and the first position that reaches it
        key = (tok_idx // P) * d + feat_idx
        position = tok_idx % P
        seq_max = torch.zeros(B * d, device=vals.device).scatter_reduce_(0, key, vals, "amax")
        at_max = vals == seq_max[key]
        seq_arg = torch.full((B * d,), P, dtype=torch.long, device=vals.device)
        seq_arg.scatter_reduce_(0, key[at_max], position[at_max], "amin")
        seq_max, seq_arg = seq_max.view(B, d), seq_arg.masked_fill_(seq_arg == P, 0).view(B, d)
        torch.maximum(self.max, seq_max.max(dim=0).values, out=self.max)

        cand = seq_max.T.masked_fill(seq_max.T <= 0, -torch.inf)  # (d, B)
        floor = self.acts.min(dim=1, keepdim=True).values  # (d, 1), -inf while slots are free
        rows = (cand > floor).any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            return
        cand = cand[rows]  # (r, B)
        # keep the best N by (activation desc, sequence asc): a total order, so that the top-N of a corpus is
        # the same however it is split into batches or shards (see merge_stats); topk alone breaks ties arbitrarily
        pool = torch.cat([self.acts[rows], cand], dim=1)  # (r, N + B)
        pool_seq = torch.cat([self.seq[rows], seq_ids[None, :].expand(len(rows), B)], dim=1)
        by_seq = pool_seq.argsort(dim=1, stable=True)
        order = by_seq.gather(1, pool.gather(1, by_seq).argsort(dim=1, descending=True, stable=True)[:, : self.n])  # (r, N)
        kept = torch.zeros(rows.numel(), self.n + B, dtype=torch.bool, device=vals.device).scatter_(1, order, True)
        # per row, #evicted old slots == #entering candidates; nonzero() is row-major, so the two lists pair up
        r_out, slot = (~kept[:, : self.n]).nonzero(as_tuple=True)
        r_in, b = kept[:, self.n :].nonzero(as_tuple=True)
        if r_in.numel() == 0:
            return
        f = rows[r_in]  # feature of each entering candidate
        p = seq_arg[b, f]  # position of its max token
        # each sequence's own end (its last labelled position), so short padded rows shift their window left
        length = torch.where(valid.any(dim=1), P - valid.flip(1).int().argmax(dim=1), torch.ones_like(seq_ids))  # (B,)
        st = torch.minimum(p - (self.w - 1 - self.after), (length[b] - self.w).clamp(min=0)).clamp(min=0)
        idx = st[:, None] + torch.arange(self.w, device=vals.device)  # (m, W)
        inside = idx < P
        idx = idx.clamp(max=P - 1)
        f_out = rows[r_out]
        self.acts[f_out, slot] = cand[r_in, b]
        self.seq[f_out, slot] = seq_ids[b]
        self.pos[f_out, slot] = p
        self.tok[f_out, slot] = tokens[b, p]
        self.start[f_out, slot] = st
        self.win_act[f_out, slot] = window(b, idx, f).masked_fill(~inside, 0.0)
        self.win_tok[f_out, slot] = tokens[b[:, None], idx].masked_fill(~inside, -1)

    def result(self, sae_id: str, layer: int) -> ActivationStats:
        # best first; equal activations (e.g. sequences that share their first token) by sequence index
        by_seq = self.seq.masked_fill(~torch.isfinite(self.acts), torch.iinfo(torch.int64).max).argsort(dim=1, stable=True)
        _, order = self.acts.gather(1, by_seq).sort(dim=1, descending=True, stable=True)
        order = by_seq.gather(1, order)
        top = self.acts.gather(1, order)
        empty = ~torch.isfinite(top)

        def sort(t: torch.Tensor, fill) -> np.ndarray:
            idx = order if t.ndim == 2 else order[..., None].expand_as(t)
            mask = empty if t.ndim == 2 else empty[..., None]
            return t.gather(1, idx).masked_fill(mask, fill).cpu().numpy()

        return ActivationStats(
            sae_id=sae_id,
            layer=layer,
            n_tokens=self.n_tokens,
            n_sequences=self.n_sequences,
            fire_count=self.fire.cpu().numpy(),
            max_activation=self.max.cpu().numpy(),
            hist_edges=HIST_EDGES.copy(),
            hist_counts=self.hist.view(self.d, -1).cpu().numpy(),
            top_acts=top.masked_fill(empty, 0.0).cpu().numpy(),
            top_seq=sort(self.seq, -1),
            top_pos=sort(self.pos, 0).astype(np.int32),
            top_token=sort(self.tok, -1).astype(np.int32),
            win_start=sort(self.start, 0).astype(np.int32),
            win_tokens=sort(self.win_tok, -1).astype(np.int32),
            win_acts=sort(self.win_act, 0.0),
        )


def _check_saes(saes: Sequence[LoadedSae]) -> None:
    if not saes:
        raise ValueError("no SAEs given: pass at least one")
    ids = [s.id for s in saes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"SAE ids must be distinct, got {ids}")


def _encode(sae: LoadedSae, resid: torch.Tensor) -> torch.Tensor:
    return sae.sae.encode(resid.to(sae.sae.W_dec.device, sae.sae.W_dec.dtype))


def encode_topk(sae: LoadedSae, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a sae-lens TopK SAE, the (values, feature indices) its ``encode`` keeps per token, each (..., k),
    computed exactly as ``encode`` does before it scatters them into a dense (..., d_sae) matrix; None for
    other architectures (or when a hook is attached to the SAE's activations)."""
    s = sae.sae
    try:
        from sae_lens.saes.topk_sae import TopK
    except ImportError:  # pragma: no cover - other sae-lens layouts: take the dense path
        return None
    fn = getattr(s, "activation_fn", None)
    post = getattr(s, "hook_sae_acts_post", None)
    if not isinstance(fn, TopK) or (post is not None and (post._forward_hooks or post._forward_pre_hooks)):
        return None
    x = resid.to(s.W_dec.device, s.W_dec.dtype)
    hidden_pre = s.hook_sae_acts_pre(s.process_sae_in(x) @ s.W_enc + s.b_enc)
    if getattr(s.cfg, "rescale_acts_by_decoder_norm", False):
        hidden_pre = hidden_pre * s.W_dec.norm(dim=-1)
    values, indices = torch.topk(hidden_pre, k=fn.k, dim=-1, sorted=False)
    return values.relu(), indices


def _accumulate(sae: LoadedSae, acc: _Accumulator, resid: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor) -> None:
    sparse = encode_topk(sae, resid)
    if sparse is None:
        acc.update(_encode(sae, resid), labels, seq_ids)
    else:
        acc.update_topk(*sparse, labels, seq_ids)


def limit_tokens(sequences: Iterable[Sequence[int]], n_tokens: int | None, bos: int | None) -> Iterator[list[int]]:
    """The sequences, as lists, until ``n_tokens`` non-BOS tokens have been yielded (the last one cut to fit)."""
    seen = 0
    for seq in sequences:
        seq = [int(t) for t in seq]
        if not seq:
            continue
        if n_tokens is not None:
            left = n_tokens - seen
            if left <= 0:
                return
            counted = sum(t != bos for t in seq)
            if counted > left:
                cum = np.cumsum([t != bos for t in seq])
                seq = seq[: int(np.searchsorted(cum, left)) + 1]
                counted = left
            seen += counted
        yield seq


def _batches(
    sequences: Iterable[Sequence[int]], batch_size: int, n_tokens: int | None, bos: int | None, pad: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]]:
    """(input_ids (B, P), attention_mask or None, labels (B, P) with -1 at BOS/padding, first sequence index)."""

    def emit(batch: list[list[int]]):
        longest = max(len(s) for s in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -1)
        if bos is not None:
            labels = labels.masked_fill(ids == bos, -1)
        return ids, (None if bool(mask.all()) else mask), labels

    index = 0
    batch: list[list[int]] = []
    for seq in limit_tokens(sequences, n_tokens, bos):
        batch.append(seq)
        if len(batch) == batch_size:
            yield (*emit(batch), index)
            index += len(batch)
            batch = []
    if batch:
        yield (*emit(batch), index)


@torch.no_grad()
def activation_pass(
    lm: LoadedModel,
    saes: Sequence[LoadedSae],
    sequences: Iterable[Sequence[int]],
    n_tokens: int | None = None,
    batch_size: int = 32,
    top_n: int = TOP_N,
    window: int = WINDOW,
    after: int = AFTER,
    progress: Progress | None = None,
    first_sequence: int = 0,
) -> list[ActivationStats]:
    """Run the model over token-id ``sequences`` (BOS first, as ``corpus.pack_sequences`` makes them) and
    collect :class:`ActivationStats` for every SAE in ``saes``; stops after ``n_tokens`` non-BOS tokens.

    ``first_sequence``: the index of the first sequence in the whole corpus, when this is one shard of it
    (contexts record global sequence indices, so that shards merge with :func:`merge_stats`)."""
    _check_saes(saes)
    layers = sorted({s.layer for s in saes})
    accs = [_Accumulator(s.width, top_n, window, after, lm.device) for s in saes]
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model.model
    bos = lm.tokenizer.bos_token_id
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    for ids, mask, labels, first in _batches(sequences, batch_size, n_tokens, bos, pad):
        ids = ids.to(lm.device)
        mask = mask.to(lm.device) if mask is not None else None
        labels = labels.to(lm.device)
        with lm.lock, capture_residuals(lm, layers, stop=True) as resid:
            run_until_stop(lambda ids=ids, mask=mask: decoder(input_ids=ids, attention_mask=mask, use_cache=False))
        seq_ids = torch.arange(first_sequence + first, first_sequence + first + len(ids), device=lm.device)
        for sae, acc in zip(saes, accs):
            _accumulate(sae, acc, resid[sae.layer], labels, seq_ids)
        if progress:
            progress(accs[0].n_tokens, n_tokens)
    return [acc.result(s.id, s.layer) for s, acc in zip(saes, accs)]


def merge_stats(a: ActivationStats, b: ActivationStats) -> ActivationStats:
    """The statistics of two disjoint parts of one corpus (sequence indices global, e.g. two shards of
    :func:`activation_pass` with their ``first_sequence``), exactly as one pass over both computes them: counts
    and histograms add, maxima take the larger, and the top-N contexts are the best N of both by (activation
    descending, sequence ascending), the order one pass keeps. Associative and commutative."""
    if (a.sae_id, a.layer, a.width) != (b.sae_id, b.layer, b.width):
        raise ValueError(f"cannot merge statistics of different SAEs: {a.sae_id!r} (width {a.width}) and {b.sae_id!r} (width {b.width})")
    if a.top_acts.shape[1:] != b.top_acts.shape[1:] or a.win_tokens.shape[1:] != b.win_tokens.shape[1:]:
        raise ValueError(f"cannot merge statistics kept with different top-N or window sizes: {a.win_tokens.shape[1:]} vs {b.win_tokens.shape[1:]}")
    if not np.array_equal(a.hist_edges, b.hist_edges):
        raise ValueError("cannot merge statistics with different histogram bins")
    shared = np.intersect1d(a.top_seq[a.top_seq >= 0], b.top_seq[b.top_seq >= 0])
    if len(shared):
        raise ValueError(f"the two parts share sequence {int(shared[0])}: merge statistics of disjoint shards only")
    n = a.top_acts.shape[1]
    seq = np.concatenate([a.top_seq, b.top_seq], axis=1)  # (d, 2N)
    act = np.concatenate([a.top_acts, b.top_acts], axis=1)
    empty = seq < 0
    primary = np.where(empty, np.inf, -act.astype(np.float64))
    secondary = np.where(empty, np.iinfo(np.int64).max, seq)
    order = np.lexsort((secondary, primary), axis=1)[:, :n]  # (d, N)

    def pick(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        both = np.concatenate([x, y], axis=1)
        idx = order if both.ndim == 2 else order[..., None]
        return np.take_along_axis(both, idx, axis=1)

    return ActivationStats(
        sae_id=a.sae_id,
        layer=a.layer,
        n_tokens=a.n_tokens + b.n_tokens,
        n_sequences=a.n_sequences + b.n_sequences,
        fire_count=a.fire_count + b.fire_count,
        max_activation=np.maximum(a.max_activation, b.max_activation),
        hist_edges=a.hist_edges.copy(),
        hist_counts=a.hist_counts + b.hist_counts,
        top_acts=pick(a.top_acts, b.top_acts),
        top_seq=pick(a.top_seq, b.top_seq),
        top_pos=pick(a.top_pos, b.top_pos),
        top_token=pick(a.top_token, b.top_token),
        win_start=pick(a.win_start, b.win_start),
        win_tokens=pick(a.win_tokens, b.win_tokens),
        win_acts=pick(a.win_acts, b.win_acts),
    )


ResidualBatch = tuple[np.ndarray | torch.Tensor, dict[int, np.ndarray | torch.Tensor]]


def _as_positions(resid: np.ndarray | torch.Tensor, B: int, P: int) -> torch.Tensor:
    """Residuals as (B, P, d): accepts (B, P, d), (B, P-1, d) or (B·(P-1), d) with the BOS column dropped."""
    x = torch.as_tensor(resid)
    if x.ndim == 2:
        if x.shape[0] != B * (P - 1):
            raise ValueError(f"flat residuals have {x.shape[0]} rows; expected batch × (positions − 1) = {B * (P - 1)}")
        x = x.reshape(B, P - 1, -1)
    if x.shape[:2] == (B, P - 1):
        x = torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)  # BOS column back, masked out later
    if x.shape[:2] != (B, P):
        raise ValueError(f"residuals of shape {tuple(x.shape)} do not match token ids of shape {(B, P)}")
    return x.float()


@torch.no_grad()
def from_residuals(
    saes: Sequence[LoadedSae],
    batches: Iterable[ResidualBatch],
    bos_token_id: int | None,
    n_tokens: int | None = None,
    top_n: int = TOP_N,
    window: int = WINDOW,
    after: int = AFTER,
    progress: Progress | None = None,
) -> list[ActivationStats]:
    """The same statistics as :func:`activation_pass` from precomputed residuals: each batch is token ids
    (B, P) with BOS first and a dict layer -> residuals (see :func:`_as_positions` for the shapes accepted),
    e.g. from :func:`iter_residual_shards`. Stops after the batch that reaches ``n_tokens``."""
    _check_saes(saes)
    device = saes[0].sae.W_dec.device
    accs = [_Accumulator(s.width, top_n, window, after, device) for s in saes]
    first = 0
    for token_ids, resid in batches:
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).to(device)
        B, P = ids.shape
        labels = ids.masked_fill(ids == bos_token_id, -1) if bos_token_id is not None else ids.clone()
        if n_tokens is not None:  # keep exactly n_tokens: drop the surplus labelled positions of this batch
            left = n_tokens - accs[0].n_tokens
            if left <= 0:
                break
            keep = (labels >= 0).reshape(-1).cumsum(0).reshape(B, P) <= left
            labels = labels.masked_fill(~keep, -1)
        seq_ids = torch.arange(first, first + B, device=device)
        for sae, acc in zip(saes, accs):
            if sae.layer not in resid:
                raise ValueError(f"the residual batch has no layer {sae.layer} (SAE '{sae.id}'); it has {sorted(resid)}")
            _accumulate(sae, acc, _as_positions(resid[sae.layer], B, P).to(device), labels, seq_ids)
        first += B
        if progress:
            progress(accs[0].n_tokens, n_tokens)
    return [acc.result(s.id, s.layer) for s, acc in zip(saes, accs)]


def iter_residual_shards(root: str | Path, layers: Sequence[int]) -> Iterator[ResidualBatch]:
    """Batches from the shards ``bundle.collect_activations_from_ids`` writes (``root/L{layer}/{i:05d}.npy`` with the
    BOS column dropped, ``root/token_ids/{i:05d}.npy``), in shard order, stopping at the first incomplete shard."""
    root = Path(root)
    names = sorted(p.name for p in (root / "token_ids").glob("*.npy") if not p.name.endswith(".tmp.npy"))
    for name in names:
        paths = {layer: root / f"L{layer}" / name for layer in layers}
        if not all(p.exists() for p in paths.values()):
            return
        yield np.load(root / "token_ids" / name), {layer: np.load(p) for layer, p in paths.items()}
