"""Everything known about the features of one SAE, in the shape the app and the CLI consume.

:func:`compute_many` computes it (logit lens, output scores, one activation pass shared by several SAEs, input
scores) through the on-disk cache of :mod:`saesteer.store`; :class:`FeatureData` holds the result and saves
and loads it as parquet + npz (no pickle). Precomputed data for the bundled SAEs lives in
``assets/features/<model>/<sae id>/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from . import store as store_mod
from .activations import (
    AFTER,
    HIST_EDGES,
    TOP_N,
    WINDOW,
    ActivationStats,
    ResidualBatch,
    activation_pass,
    from_residuals,
    limit_tokens,
)
from .config import EMBEDDED_MODEL, ScoreParams
from .models import LoadedModel
from .paths import bundled_feature_dir
from .saes import LoadedSae
from .text import join_tokens
from .scores import (
    DETAIL_RANK_CAP,
    INPUT_MAX_CONTEXTS,
    INPUT_MIN_CONTEXTS,
    LogitLens,
    OutputScoreResult,
    input_scores,
    logit_lens,
    output_scores,
    token_strings,
)

#: Corpus tokens of the activation pass when the caller does not say.
DEFAULT_TOKENS = 200_000
#: Features per saved chunk of output scores (the unit of resumption).
OUTPUT_CHUNK = 512

Only = Literal["all", "output", "input"]
#: progress(stage, done, total): stage is e.g. "logit lens", "output scores", "activations".
StageProgress = Callable[[str, int, int | None], None]

TABLE_COLUMNS = [
    "feature", "output_score", "input_score", "density", "max_activation", "top_tokens", "bottom_tokens",
    "n_contexts", "min_rank", "max_prob",
]


class FeatureDataError(RuntimeError):
    """Saved feature data is missing, damaged or from another format; the message names the directory."""


@dataclass
class Context:
    """One top activating context of a feature: a token window around its max-activating token."""

    tokens: list[str]
    token_ids: list[int]
    acts: list[float]
    max_pos: int
    """Index into ``tokens`` of the max-activating token."""
    activation: float
    """The feature's maximum activation over the whole sequence (at ``max_pos``)."""
    doc_index: int
    """Index of the sequence in the activation pass."""


@dataclass
class FeatureData:
    """Per-feature scores, logit lens, activation statistics and top contexts of one SAE.

    Row i of ``table`` and of every array is feature ``table.feature[i]``. Context arrays are best first with
    ``n_contexts`` filled slots; window tokens are -1 where the window leaves the sequence or hits BOS/padding.
    """

    meta: dict
    table: pd.DataFrame
    lens: LogitLens
    vocab: dict[int, str]
    hist_edges: np.ndarray  # (n_bins + 1,)
    hist_counts: np.ndarray  # (n, n_bins) int32; (n, 0) without a corpus pass
    ctx_act: np.ndarray  # (n, N) float32
    ctx_seq: np.ndarray  # (n, N) int32
    ctx_pos: np.ndarray  # (n, N) int16, index of the max token within the window
    ctx_tokens: np.ndarray  # (n, N, W) int32
    ctx_acts: np.ndarray  # (n, N, W) float16
    out_ranks: np.ndarray  # (n, k) int32, >= rank_cap means "at least"; (n, 0) without output scores
    out_probs: np.ndarray  # (n, k) float32
    ctx_start: np.ndarray | None = None  # (n, N) int32, sequence position of each window's first token
    _rows: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._rows = {int(f): i for i, f in enumerate(self.table["feature"].to_numpy())}

    # -- lookup -----------------------------------------------------------------------------------

    @property
    def features(self) -> np.ndarray:
        return self.table["feature"].to_numpy()

    @property
    def has_contexts(self) -> bool:
        return self.ctx_tokens.ndim == 3 and self.ctx_tokens.shape[1] > 0

    @property
    def has_output_scores(self) -> bool:
        return self.out_ranks.shape[1] > 0

    def row(self, feature: int) -> int:
        try:
            return self._rows[int(feature)]
        except (KeyError, TypeError, ValueError):
            lo, hi = (int(self.features.min()), int(self.features.max())) if len(self.features) else (0, -1)
            raise KeyError(f"feature {feature!r} is not in this data: it covers features {lo}..{hi}") from None

    def token_text(self, ids: Iterable[int]) -> list[str]:
        return [self.vocab.get(int(i), f"<{int(i)}>") for i in ids]

    def top_tokens(self, feature: int) -> list[str]:
        return self.token_text(self.lens.top_ids[self.row(feature)])

    def bottom_tokens(self, feature: int) -> list[str]:
        return self.token_text(self.lens.bottom_ids[self.row(feature)])

    def contexts(self, feature: int, limit: int | None = None) -> list[Context]:
        """Top activating contexts of ``feature``, best first."""
        if not self.has_contexts:
            return []
        r = self.row(feature)
        # Shipped data keeps fewer windows than the n_contexts the input score counted (see trim_contexts).
        n = min(int(self.table["n_contexts"].iat[r]), self.ctx_tokens.shape[1])
        out = []
        for i in range(n if limit is None else min(n, limit)):
            ids = self.ctx_tokens[r, i]
            keep = ids >= 0
            kept_ids = [int(t) for t in ids[keep]]
            max_pos = int(keep[: int(self.ctx_pos[r, i])].sum())
            out.append(
                Context(
                    tokens=self.token_text(kept_ids),
                    token_ids=kept_ids,
                    acts=[float(a) for a in self.ctx_acts[r, i][keep]],
                    max_pos=max_pos,
                    activation=float(self.ctx_act[r, i]),
                    doc_index=int(self.ctx_seq[r, i]),
                )
            )
        return out

    def histogram(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(bin edges, counts) of the feature's positive activations over the corpus (log-spaced fixed bins)."""
        if self.hist_counts.shape[1] == 0:
            return self.hist_edges.copy(), np.zeros(max(len(self.hist_edges) - 1, 0), np.int64)
        return self.hist_edges.copy(), self.hist_counts[self.row(feature)].astype(np.int64)

    def output_details(self, feature: int) -> pd.DataFrame:
        """The feature's logit-lens tokens T with their lens logit and their rank and probability after
        amplifying the feature on the neutral prompt (rank 0 = most likely; ``rank_exact`` False means the
        rank is at least the value shown)."""
        r = self.row(feature)
        ids = self.lens.top_ids[r]
        k = self.out_ranks.shape[1]
        cap = int(self.meta.get("rank_cap", DETAIL_RANK_CAP))
        ranks = self.out_ranks[r] if k else np.full(len(ids), -1)
        probs = self.out_probs[r] if k else np.full(len(ids), np.nan, np.float32)
        n = min(len(ids), len(ranks)) if k else len(ids)
        return pd.DataFrame(
            {
                "token": self.token_text(ids[:n]),
                "token_id": ids[:n].astype(np.int64),
                "lens_logit": self.lens.top_logits[r, :n].astype(np.float64),
                "rank": ranks[:n].astype(np.int64),
                "rank_exact": (ranks[:n] < cap) & (ranks[:n] >= 0),
                "prob": probs[:n].astype(np.float64),
            }
        )

    def subset(self, features: Sequence[int]) -> FeatureData:
        """The same data restricted to ``features`` (in that order)."""
        rows = np.array([self.row(f) for f in features], dtype=np.int64)
        table = self.table.iloc[rows].reset_index(drop=True)
        return FeatureData(self.meta, table, self.lens.subset(self.features[rows]), self.vocab, self.hist_edges,
                           self.hist_counts[rows], self.ctx_act[rows], self.ctx_seq[rows], self.ctx_pos[rows],
                           self.ctx_tokens[rows], self.ctx_acts[rows], self.out_ranks[rows], self.out_probs[rows],
                           None if self.ctx_start is None else self.ctx_start[rows])

    # -- persistence ------------------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "lens_features": self.lens.features.astype(np.int64),
            "lens_top_ids": self.lens.top_ids.astype(np.int32),
            "lens_top_logits": self.lens.top_logits.astype(np.float32),
            "lens_bottom_ids": self.lens.bottom_ids.astype(np.int32),
            "lens_bottom_logits": self.lens.bottom_logits.astype(np.float32),
            "hist_edges": self.hist_edges.astype(np.float64),
            "hist_counts": self.hist_counts.astype(np.int32),
            "ctx_act": self.ctx_act.astype(np.float32),
            "ctx_seq": self.ctx_seq.astype(np.int32),
            "ctx_pos": self.ctx_pos.astype(np.int16),
            **_encode_windows(self.ctx_tokens, self.ctx_seq, self.ctx_start),
            "ctx_acts": self.ctx_acts.astype(np.float16),
            "out_ranks": self.out_ranks.astype(np.int32),
            "out_probs": self.out_probs.astype(np.float32),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``table.parquet``, ``tokens.parquet``, ``arrays.npz`` and ``meta.json`` (each atomically)."""
        d = Path(directory)
        vocab = pd.DataFrame({"id": np.array(sorted(self.vocab), dtype=np.int32)})
        vocab["text"] = [self.vocab[int(i)] for i in vocab["id"]]
        store_mod.atomic_write_bytes(d / "table.parquet", store_mod.table_to_bytes(self.table))
        store_mod.atomic_write_bytes(d / "tokens.parquet", store_mod.table_to_bytes(vocab))
        store_mod.atomic_write_bytes(d / "arrays.npz", store_mod.arrays_to_bytes(self._arrays(), compress=True))
        store_mod.atomic_write_bytes(d / "meta.json", json.dumps(self.meta, indent=1, sort_keys=True, default=str).encode())
        return d

    @classmethod
    def load(cls, directory: str | Path) -> FeatureData:
        d = Path(directory)
        parts = {}
        for name in ("meta.json", "table.parquet", "tokens.parquet", "arrays.npz"):
            path = d / name
            if not path.exists():
                raise FeatureDataError(f"{d} holds no feature data ({name} is missing): compute it with `python -m saesteer scores`")
            data = store_mod.read_verified(path)
            if data is None:
                raise FeatureDataError(f"{path} is damaged (its size or checksum does not match): recompute it")
            parts[name] = data
        try:
            meta = json.loads(parts["meta.json"])
            table = store_mod.table_from_bytes(parts["table.parquet"])
            vocab_frame = store_mod.table_from_bytes(parts["tokens.parquet"])
            a = store_mod.arrays_from_bytes(parts["arrays.npz"])
        except Exception as exc:  # verified bytes that do not parse: another format version
            raise FeatureDataError(f"cannot read feature data in {d}: {exc.__class__.__name__}: {exc}") from exc
        lens = LogitLens(a["lens_features"], a["lens_top_ids"].astype(np.int64), a["lens_top_logits"],
                         a["lens_bottom_ids"].astype(np.int64), a["lens_bottom_logits"])
        vocab = dict(zip(vocab_frame["id"].astype(int).tolist(), vocab_frame["text"].tolist()))
        tokens, start = _decode_windows(a, a["ctx_seq"], a["ctx_acts"].shape)
        return cls(meta, table, lens, vocab, a["hist_edges"], a["hist_counts"], a["ctx_act"], a["ctx_seq"], a["ctx_pos"],
                   tokens, a["ctx_acts"], a["out_ranks"], a["out_probs"], start)


def _encode_windows(tokens: np.ndarray, docs: np.ndarray, start: np.ndarray | None) -> dict[str, np.ndarray]:
    """Context windows on disk: the windows of one sequence overlap and many features share sequences, so store
    each referenced sequence once (``seq_tokens``, rows ``seq_docs``) plus each window's start. Falls back to
    the windows themselves when starts are unknown or the sequences would not reproduce them exactly."""
    plain = {"ctx_tokens": tokens.astype(np.int32)}
    if start is None or tokens.ndim != 3 or tokens.shape[1] == 0:
        return plain
    w = tokens.shape[2]
    used = docs >= 0
    seq_docs = np.unique(docs[used]).astype(np.int32)
    width = int((start[used] + w).max()) if used.any() else w
    table = np.full((len(seq_docs), width), -1, np.int32)
    rows = np.searchsorted(seq_docs, docs[used])
    cols = start[used][:, None] + np.arange(w)  # (m, W)
    table[rows[:, None], cols] = tokens[used]
    encoded = {"seq_tokens": table, "seq_docs": seq_docs, "ctx_start": start.astype(np.int32)}
    decoded, _ = _decode_windows(encoded, docs, tokens.shape)
    return encoded if np.array_equal(decoded, tokens) else plain


def _decode_windows(a: dict[str, np.ndarray], docs: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """(ctx_tokens (n, N, W), ctx_start or None) from what :func:`_encode_windows` wrote."""
    if "ctx_tokens" in a:
        return a["ctx_tokens"], a.get("ctx_start")
    table, seq_docs, start = a["seq_tokens"], a["seq_docs"], a["ctx_start"]
    w = shape[2]
    used = docs >= 0
    if used.any() and (len(table) == 0 or int((start[used] + w).max()) > table.shape[1]):
        raise FeatureDataError("stored context windows reach past their sequences: the feature data is inconsistent")
    base = np.searchsorted(seq_docs, docs).astype(np.int64) * table.shape[1] + start  # (n, N) flat offset
    base[~used] = 0
    tokens = np.take(table.reshape(-1), base[..., None] + np.arange(w)) if table.size else np.zeros(shape, np.int32)
    tokens[~used] = -1
    return tokens, start


# ---------------------------------------------------------------------------------------------------
# Assembly


def build_feature_data(
    lm: LoadedModel,
    lens: LogitLens,
    out: OutputScoreResult | None,
    stats: ActivationStats | None,
    meta: dict,
) -> FeatureData:
    """Join the logit lens, output scores and activation statistics (rows: ``lens.features``) into a FeatureData."""
    feats = lens.features
    n = len(feats)
    table = pd.DataFrame({"feature": feats.astype(np.int64)})
    if out is not None:
        if not np.array_equal(out.features, feats):
            raise ValueError("output scores and logit lens cover different features")
        table["output_score"], table["min_rank"], table["max_prob"] = out.score, out.min_rank.astype(np.int64), out.max_prob
        out_ranks, out_probs = out.ranks.astype(np.int32), out.probs.astype(np.float32)
    else:
        table["output_score"], table["min_rank"], table["max_prob"] = math.nan, -1, math.nan
        out_ranks, out_probs = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
    if stats is not None:
        rows = feats
        n_ctx = stats.n_contexts[rows]
        table["input_score"] = input_scores(stats.top_token[rows], n_ctx, lens)
        table["density"] = stats.density[rows]
        table["max_activation"] = stats.max_activation[rows].astype(np.float64)
        table["n_contexts"] = n_ctx.astype(np.int64)
        ctx_pos = (stats.top_pos - stats.win_start)[rows].astype(np.int16)
        ctx = (stats.top_acts[rows].astype(np.float32), stats.top_seq[rows].astype(np.int32), ctx_pos,
               stats.win_tokens[rows].astype(np.int32), np.clip(stats.win_acts[rows], -65000, 65000).astype(np.float16))
        ctx_start = stats.win_start[rows].astype(np.int32)
        hist_edges, hist_counts = stats.hist_edges, stats.hist_counts[rows].astype(np.int32)
    else:
        table["input_score"], table["density"], table["max_activation"], table["n_contexts"] = math.nan, math.nan, math.nan, 0
        ctx = (np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int16),
               np.zeros((n, 0, 0), np.int32), np.zeros((n, 0, 0), np.float16))
        hist_edges, hist_counts = HIST_EDGES.copy(), np.zeros((n, 0), np.int32)
        ctx_start = None
    used = np.unique(np.concatenate([lens.top_ids.reshape(-1), lens.bottom_ids.reshape(-1), ctx[3].reshape(-1)]))
    used = used[used >= 0]
    vocab = dict(zip(used.tolist(), token_strings(lm, used)))
    table["top_tokens"] = [join_tokens(vocab[int(i)] for i in r) for r in lens.top_ids]
    table["bottom_tokens"] = [join_tokens(vocab[int(i)] for i in r) for r in lens.bottom_ids]
    table = table[TABLE_COLUMNS]
    meta = {**meta, "n_features": n, "rank_cap": out.rank_cap if out is not None else DETAIL_RANK_CAP}
    return FeatureData(meta, table, lens, vocab, hist_edges, hist_counts, *ctx, out_ranks, out_probs, ctx_start)


def take_sequences(sequences: Iterable[Sequence[int]], n_tokens: int | None, bos: int | None) -> list[list[int]]:
    """The sequences an activation pass over ``n_tokens`` non-BOS tokens reads (the last one cut to fit)."""
    return list(limit_tokens(sequences, n_tokens, bos))


def check_only(only: str, corpus_sequences) -> None:
    """Refuse an unknown ``only``, and input scores asked for without a corpus."""
    if only not in ("all", "output", "input"):
        raise ValueError(f"only={only!r} is unknown: use 'all', 'output' or 'input'")
    if only != "output" and corpus_sequences is None:
        raise ValueError("input scores need a corpus: pass corpus_sequences, or use only='output'")


def corpus_pass_sequences(lm: LoadedModel, corpus_sequences, n_tokens: int | None, only: str) -> tuple[list[list[int]] | None, str | None]:
    """The sequences the activation pass reads and their fingerprint (the corpus part of the cache keys);
    (None, None) when ``only="output"`` needs no corpus. An empty corpus is refused."""
    if only == "output":
        return None, None
    seqs = take_sequences(corpus_sequences, n_tokens, lm.tokenizer.bos_token_id)
    if not seqs:
        raise ValueError("the corpus yielded no tokens")
    return seqs, store_mod.tokens_fingerprint(seqs)


def load_bundled(sae_id: str, model_name: str = EMBEDDED_MODEL) -> FeatureData | None:
    """Precomputed data shipped for a bundled SAE, or None when there is none (or it is damaged)."""
    d = bundled_feature_dir(model_name, sae_id)
    if not (d / "meta.json").exists():
        return None
    try:
        return FeatureData.load(d)
    except FeatureDataError:
        return None


def matching_bundled(lm: LoadedModel, sae: LoadedSae, params: ScoreParams | None = None) -> FeatureData | None:
    """Shipped data for ``sae`` if it was computed for these very weights (model and SAE fingerprints) and
    output-score parameters, whatever corpus slice it used; else None."""
    params = params or ScoreParams()
    data = load_bundled(sae.id, lm.name)
    if data is None:
        return None
    m = data.meta
    want = {"prompt": params.prompt, "amp": params.amp, "top_k": params.top_k}
    same_params = all(m.get("params", {}).get(k) == v for k, v in want.items())
    if (m.get("only") == "all" and same_params and m.get("model_fingerprint") == store_mod.model_fingerprint(lm)
            and m.get("sae_fingerprint") == store_mod.sae_fingerprint(sae)):
        return data
    return None


#: The arrays of :func:`stats_to_arrays` with one row per latent (the others are the token and sequence counts and
#: the histogram's edges).
STATS_PER_LATENT = ("fire_count", "max_activation", "hist_counts", "top_acts", "top_seq", "top_pos", "top_token",
                    "win_start", "win_tokens", "win_acts")


def stats_to_arrays(s: ActivationStats) -> dict[str, np.ndarray]:
    """Activation statistics as the arrays the cache stores (:func:`stats_from_arrays` reads them back)."""
    return {
        "n_tokens": np.array(s.n_tokens), "n_sequences": np.array(s.n_sequences), "fire_count": s.fire_count,
        "max_activation": s.max_activation, "hist_edges": s.hist_edges, "hist_counts": s.hist_counts,
        "top_acts": s.top_acts, "top_seq": s.top_seq, "top_pos": s.top_pos, "top_token": s.top_token,
        "win_start": s.win_start, "win_tokens": s.win_tokens, "win_acts": s.win_acts,
    }


def stats_from_arrays(sae: LoadedSae, a: dict[str, np.ndarray]) -> ActivationStats:
    """The statistics :func:`stats_to_arrays` stored, for ``sae``."""
    return ActivationStats(sae.id, sae.layer, int(a["n_tokens"]), int(a["n_sequences"]), a["fire_count"], a["max_activation"],
                           a["hist_edges"], a["hist_counts"], a["top_acts"], a["top_seq"], a["top_pos"], a["top_token"],
                           a["win_start"], a["win_tokens"], a["win_acts"])


def output_to_arrays(r: OutputScoreResult) -> dict[str, np.ndarray]:
    """Output scores as the arrays the cache stores, one row per feature (:func:`output_from_arrays` reads them back)."""
    n = len(r.features)
    return {"features": r.features, "score": r.score, "min_rank": r.min_rank, "max_prob": r.max_prob, "token_ids": r.token_ids,
            "ranks": r.ranks, "probs": r.probs, "added": np.full(n, r.added_activation)}


def output_from_arrays(a: dict[str, np.ndarray], vocab_size: int, rank_cap: int) -> OutputScoreResult:
    """The output scores :func:`output_to_arrays` stored."""
    added = float(a["added"][0]) if len(a["added"]) else math.nan
    return OutputScoreResult(a["features"], a["score"], a["min_rank"], a["max_prob"], a["token_ids"], a["ranks"], a["probs"],
                             added, vocab_size, rank_cap)


def _score_part(params: ScoreParams) -> dict:
    return {"prompt": params.prompt, "amp": params.amp, "top_k": params.top_k, "rank_cap": DETAIL_RANK_CAP}


def _act_part(corpus_fp: str | None, top_n: int, window: int, after: int) -> dict:
    return {"corpus": corpus_fp, "top_n": top_n, "window": window, "after": after, "bins": HIST_EDGES.tolist()}


@dataclass(frozen=True)
class CacheKeys:
    """Store keys of one SAE's cached results (see :func:`cache_keys`)."""

    lens: str
    """``lens.npz``: the logit lens of every feature."""
    output: str
    """``output/<start>-<stop>.npz``: output scores in chunks of OUTPUT_CHUNK features."""
    activations: str
    """``activations.npz``: the activation statistics of the corpus pass."""
    full: str
    """The assembled FeatureData (what shipped data records as ``meta.key``)."""


def cache_keys(
    model_fp: str,
    sae_fp: str,
    params: ScoreParams,
    corpus_fp: str | None = None,
    only: str = "all",
    top_n: int = TOP_N,
    window: int = WINDOW,
    after: int = AFTER,
) -> CacheKeys:
    """The keys under which :func:`compute_many` caches the results for one model and SAE: the one home of
    what each result depends on, shared with the distributed runner (:mod:`saesteer.distributed`)."""
    score_part, act_part = _score_part(params), _act_part(corpus_fp, top_n, window, after)
    return CacheKeys(
        lens=store_mod.make_key("lens", model_fp, sae_fp, params.top_k),
        output=store_mod.make_key("output", model_fp, sae_fp, score_part),
        activations=store_mod.make_key("activations", model_fp, sae_fp, act_part),
        full=store_mod.make_key("features", model_fp, sae_fp, score_part, act_part, only),
    )


def compute_many(
    lm: LoadedModel,
    saes: Sequence[LoadedSae],
    corpus_sequences: Iterable[Sequence[int]] | None = None,
    params: ScoreParams | None = None,
    n_tokens: int | None = DEFAULT_TOKENS,
    only: Only = "all",
    cache: bool = True,
    progress: StageProgress | None = None,
    features: Sequence[int] | None = None,
    store: store_mod.Store | None = None,
    corpus_name: str = "",
    batch_sequences: int = 32,
    top_n: int = TOP_N,
    window: int = WINDOW,
    after: int = AFTER,
    use_bundled: bool = True,
    residuals: Callable[[], Iterable[ResidualBatch]] | None = None,
) -> list[FeatureData]:
    """Feature data for several SAEs of one model; their activation statistics come from one shared pass.

    ``residuals``, when given, yields precomputed residual batches of exactly these corpus sequences, in order
    (e.g. ``activations.iter_residual_shards`` of the collection that read them): the statistics then come from
    them instead of a model pass, with the same cache key. Each batch's token ids are checked against the corpus.

    ``only="output"`` skips the corpus (input score, density, max activation and contexts are NaN/empty);
    ``only="input"`` skips the output scores. ``features`` restricts the rows (the activation pass still sees
    every feature, it costs the same). Results are read from and written to the cache unless ``cache=False``.
    """
    params = params or ScoreParams()
    check_only(only, corpus_sequences)
    store = store or store_mod.Store(enabled=cache)
    if not cache:
        store = store_mod.Store(store.root, enabled=False)
    report = progress or (lambda stage, done, total: None)
    fp_model = store_mod.model_fingerprint(lm)
    fps = {s.id: store_mod.sae_fingerprint(s) for s in saes}
    if features is not None and len(features) == 0:
        raise ValueError("no features selected: give at least one feature id, or none for all")
    for s in saes:
        for f in features if features is not None else ():
            s.check_feature(int(f))

    seqs, corpus_fp = corpus_pass_sequences(lm, corpus_sequences, n_tokens, only)
    score_part, act_part = _score_part(params), _act_part(corpus_fp, top_n, window, after)

    def full_key(s: LoadedSae) -> str:
        return cache_keys(fp_model, fps[s.id], params, corpus_fp, only, top_n, window, after).full

    results: dict[str, FeatureData] = {}
    if use_bundled and only == "all" and cache:
        for s in saes:
            pre = load_bundled(s.id, lm.name)
            if pre is not None and pre.meta.get("key") == full_key(s):
                results[s.id] = pre.subset(features) if features is not None else pre

    todo = [s for s in saes if s.id not in results]
    stats: dict[str, ActivationStats] = {}
    if only != "output" and todo:
        keys = {s.id: cache_keys(fp_model, fps[s.id], params, corpus_fp, only, top_n, window, after).activations for s in todo}
        missing = []
        for s in todo:
            a = store.load_arrays(keys[s.id], "activations.npz")
            if a is not None:
                stats[s.id] = stats_from_arrays(s, a)
            else:
                missing.append(s)
        if missing:
            total = sum(sum(t != lm.tokenizer.bos_token_id for t in q) for q in seqs)
            if residuals is None:
                fresh = activation_pass(lm, missing, seqs, None, batch_sequences, top_n, window, after,
                                        progress=lambda done, _t: report("activations", done, total))
            else:
                fresh = from_residuals(missing, _matching(residuals(), seqs), lm.tokenizer.bos_token_id, total, top_n,
                                       window, after, progress=lambda done, _t: report("activations", done, total))
            for s, st in zip(missing, fresh):
                stats[s.id] = st
                store.save_arrays(keys[s.id], "activations.npz", stats_to_arrays(st))

    for s in todo:
        feats = np.arange(s.width, dtype=np.int64) if features is None else np.asarray(features, dtype=np.int64)
        lens_key = cache_keys(fp_model, fps[s.id], params, corpus_fp, only, top_n, window, after).lens
        cached = store.load_arrays(lens_key, "lens.npz")
        if cached is not None and len(cached["features"]) == s.width:
            lens = LogitLens(cached["features"], cached["top_ids"], cached["top_logits"], cached["bottom_ids"], cached["bottom_logits"])
        else:
            lens = logit_lens(lm, s, k=params.top_k, progress=lambda d, t, sid=s.id: report(f"logit lens {sid}", d, t))
            store.save_arrays(lens_key, "lens.npz", {"features": lens.features, "top_ids": lens.top_ids, "top_logits": lens.top_logits,
                                                      "bottom_ids": lens.bottom_ids, "bottom_logits": lens.bottom_logits}, compress=False)
        lens = lens.subset(feats)
        out = None
        if only != "input":
            out = _output_scores_cached(lm, s, params, feats, lens, store, fp_model, fps[s.id], score_part,
                                        lambda d, t, sid=s.id: report(f"output scores {sid}", d, t))
        meta = {
            "model": lm.name, "sae_id": s.id, "layer": s.layer, "hook_name": s.hook_name, "width": s.width,
            "model_fingerprint": fp_model, "sae_fingerprint": fps[s.id], "corpus": corpus_name, "corpus_fingerprint": corpus_fp,
            "n_tokens": stats[s.id].n_tokens if s.id in stats else 0, "params": {**score_part, "batch_size": params.batch_size},
            "activations": {k: v for k, v in act_part.items() if k != "bins"}, "only": only, "key": full_key(s),
            "input_score": {"max_contexts": INPUT_MAX_CONTEXTS, "min_contexts": INPUT_MIN_CONTEXTS},
            "added_activation": out.added_activation if out is not None else None,
        }
        results[s.id] = build_feature_data(lm, lens, out, stats.get(s.id), meta)
    return [results[s.id] for s in saes]


def _matching(batches: Iterable[ResidualBatch], seqs: list[list[int]]) -> Iterator[ResidualBatch]:
    """The residual batches, refusing any whose token ids are not the next corpus sequences."""
    row = 0
    for ids, resid in batches:
        if row >= len(seqs):
            return
        ids = np.asarray(ids)
        want = seqs[row : row + len(ids)]
        if any(list(map(int, got[: len(w)])) != list(w) for got, w in zip(ids, want)):
            raise ValueError(f"precomputed residuals do not match the corpus at sequence {row}: they were collected from other text")
        row += len(ids)
        yield ids, resid
    if row < len(seqs):
        raise ValueError(f"precomputed residuals cover {row} of the corpus' {len(seqs)} sequences")


def compute_feature_data(
    lm: LoadedModel,
    sae: LoadedSae,
    corpus_sequences: Iterable[Sequence[int]] | None,
    params: ScoreParams | None = None,
    n_tokens: int | None = DEFAULT_TOKENS,
    cache: bool = True,
    progress: StageProgress | None = None,
    **kwargs,
) -> FeatureData:
    """:func:`compute_many` for one SAE (same keyword arguments, e.g. ``only``, ``features``, ``store``)."""
    return compute_many(lm, [sae], corpus_sequences, params, n_tokens, cache=cache, progress=progress, **kwargs)[0]


def _output_scores_cached(lm, sae, params, feats, lens, store, fp_model, fp_sae, score_part, progress) -> OutputScoreResult:
    """Computed and saved in chunks of OUTPUT_CHUNK features (the unit of resumption). For a subset of the
    features, complete chunks already in the cache are reused and the rest is computed without saving."""
    key = cache_keys(fp_model, fp_sae, params).output
    batch = ScoreParams(params.prompt, params.amp, params.top_k, min(params.batch_size, OUTPUT_CHUNK))
    all_feats = np.arange(sae.width, dtype=np.int64)
    if len(feats) == sae.width and np.array_equal(feats, all_feats):

        def compute(start: int, stop: int) -> dict[str, np.ndarray]:
            return output_to_arrays(output_scores(lm, sae, batch, features=all_feats[start:stop], lens=lens))

        arrays = store.chunked(key, "output", sae.width, OUTPUT_CHUNK, compute, progress)
        return output_from_arrays(arrays, lm.vocab_size, DETAIL_RANK_CAP)
    found: dict[int, dict[str, np.ndarray]] = {}
    for start in sorted({int(f) // OUTPUT_CHUNK * OUTPUT_CHUNK for f in feats}):
        stop = min(start + OUTPUT_CHUNK, sae.width)
        part = store.load_arrays(key, f"output/{start:08d}-{stop:08d}.npz")
        if part is not None and len(part["features"]) == stop - start:
            for i, f in enumerate(part["features"]):
                found[int(f)] = {k: v[i] for k, v in part.items()}
    rest = np.array([f for f in feats if int(f) not in found], dtype=np.int64)
    if len(rest):
        fresh = output_to_arrays(output_scores(lm, sae, batch, features=rest, lens=lens.subset(rest), progress=progress))
        for i, f in enumerate(rest):
            found[int(f)] = {k: v[i] for k, v in fresh.items()}
    arrays = {k: np.stack([found[int(f)][k] for f in feats]) for k in found[int(feats[0])]}
    return output_from_arrays(arrays, lm.vocab_size, DETAIL_RANK_CAP)


def trim_contexts(data: FeatureData, keep: int, window: int, after: int = AFTER) -> FeatureData:
    """A copy that stores only the best ``keep`` contexts, each cut to ``window`` tokens around its max token.

    Scores, ``n_contexts`` and the input score are unchanged (they were computed from all contexts); this only
    shrinks what is saved, e.g. for the precomputed data shipped in the repository.
    """
    keep = min(keep, data.ctx_tokens.shape[1])
    width = data.ctx_tokens.shape[2] if data.ctx_tokens.ndim == 3 else 0
    window = min(window, width)
    pos = data.ctx_pos[:, :keep].astype(np.int64)  # (n, keep)
    start = np.clip(pos - (window - 1 - after), 0, max(width - window, 0))
    idx = start[..., None] + np.arange(window)  # (n, keep, window)
    tokens = np.take_along_axis(data.ctx_tokens[:, :keep], idx, axis=2)
    acts = np.take_along_axis(data.ctx_acts[:, :keep], idx, axis=2)
    meta = {**data.meta, "stored_contexts": keep, "stored_window": window}
    seq_start = None if data.ctx_start is None else (data.ctx_start[:, :keep] + start).astype(np.int32)
    return FeatureData(meta, data.table.copy(), data.lens, data.vocab, data.hist_edges, data.hist_counts,
                       data.ctx_act[:, :keep].copy(), data.ctx_seq[:, :keep].copy(), (pos - start).astype(np.int16),
                       tokens, acts, data.out_ranks, data.out_probs, seq_start)
