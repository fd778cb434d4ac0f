"""Candidate features of a concept, from the input side and from the output side, and the picks made from them.

A *concept* is a word or short phrase; its token ids come from :func:`concept_token_ids` (the single-token
encodings of the concept as given, lower-cased and capitalised, each with and without a leading space).

- **Input-side candidates** fire on the concept. Among a feature's top activating contexts (best first, at
  most ``CandidateParams.max_contexts``), the *firing share* is the share whose peak (max-activating) token is
  one of the concept's tokens; a feature is an input-side candidate when its share is >= ``theta`` and it has
  at least ``min_contexts`` contexts. This is the offline stand-in for searching explanations (which describe
  what activates a feature), how users of Neuronpedia find features, and how AxBench labelled its SAE features.
- **Output-side candidates** promote the concept: one of its tokens is among the feature's top-``top_k``
  logit-lens tokens.

Picks (ties go to the lowest feature id):

- ``activation_pick``: the input-side candidate with the highest firing share (then the higher mean peak
  activation over the concept contexts): what a user of activation-based search would take;
- ``output_pick``: the highest output score over the union of both candidate sets;
- ``filtered``: every input-side candidate whose output score is >= ``tau`` (the paper's filter);
- ``random_pick``: a seeded random member of the union.

:class:`FeatureBank` holds what selection needs; build it from bundled/computed feature data with
:meth:`FeatureBank.from_feature_data` (tiny test fixtures too). The API below is stable: other modules
(the concept duel of the demo, the concept-level evaluation) build on it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import ConfigError, check_whole

#: Firing-share threshold of an input-side candidate: at least this share of its top contexts peak on a
#: concept token. 0.5 means "most of what most strongly activates the feature is the concept".
DEFAULT_THETA = 0.5
#: Output-score threshold of the paper's filter (kept input-side candidates have output score >= tau).
DEFAULT_TAU = 0.01


@dataclass(frozen=True)
class CandidateParams:
    """How candidates are found and filtered."""

    theta: float = DEFAULT_THETA
    """Input side: minimum share of top contexts whose peak token is a concept token, in (0, 1]."""
    tau: float = DEFAULT_TAU
    """Output filter: input-side candidates with output score >= tau are kept, tau >= 0."""
    top_k: int = 20
    """Output side: logit-lens tokens per feature searched for the concept's tokens."""
    max_contexts: int = 100
    """Input side: at most this many top contexts per feature count (the paper's 100)."""
    min_contexts: int = 10
    """Input side: features with fewer top contexts than this are never input-side candidates (the paper's 10)."""
    seed: int = 0
    """Seeds the random pick (with the concept's text)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.theta, (int, float)) and 0 < self.theta <= 1):
            raise ConfigError(f"theta must be in (0, 1], got {self.theta!r}")
        if not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau >= 0):
            raise ConfigError(f"tau must be a finite number >= 0, got {self.tau!r}")
        for name in ("top_k", "max_contexts", "min_contexts"):
            check_whole(name, getattr(self, name))


def concept_variants(concept: str) -> list[str]:
    base = concept.strip()
    forms = dict.fromkeys([base, base.lower(), base[:1].upper() + base[1:].lower()])
    return [space + f for f in forms for space in ("", " ")]


def concept_token_ids(tokenizer, concept: str) -> list[int]:
    """Token ids of the concept: the single-token encodings of its variants (a phrase with no single-token
    form falls back to the first token of each variant); special tokens (also <unk>) never count."""
    special = set(tokenizer.all_special_ids)
    encodings = [list(tokenizer(v, add_special_tokens=False).input_ids) for v in concept_variants(concept)]
    ids = {e[0] for e in encodings if len(e) == 1 and e[0] not in special}
    if not ids and " " in concept.strip():
        ids = {e[0] for e in encodings if e and e[0] not in special}
    return sorted(ids)


@dataclass
class FeatureBank:
    """Per feature, what candidate selection needs. Row i of every array is feature ``features[i]``."""

    features: np.ndarray  # (n,) int64, ascending
    top_ids: np.ndarray  # (n, k) int64, logit-lens top tokens, best first
    output_score: np.ndarray  # (n,) float64
    input_score: np.ndarray  # (n,) float64, NaN where a feature has too few contexts
    density: np.ndarray  # (n,) float64, share of corpus tokens where the feature fires
    peak_ids: np.ndarray  # (n, N) int64, peak token id of each top context (best first), -1 where none
    peak_acts: np.ndarray  # (n, N) float64, the activation at that peak
    n_contexts: np.ndarray  # (n,) int64, top contexts the feature has (may exceed N: shipped data keeps fewer)
    source: str = ""
    _rows: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        order = np.argsort(self.features, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            for name in ("features", "top_ids", "output_score", "input_score", "density", "peak_ids", "peak_acts", "n_contexts"):
                setattr(self, name, getattr(self, name)[order])
        self._rows = {int(f): i for i, f in enumerate(self.features)}

    def row(self, feature: int) -> int:
        try:
            return self._rows[int(feature)]
        except (KeyError, TypeError, ValueError):
            raise KeyError(f"feature {feature!r} is not in this feature data ({len(self.features)} features)") from None

    def has(self, feature: int) -> bool:
        """Whether ``feature`` is in this feature data."""
        try:
            return int(feature) in self._rows
        except (TypeError, ValueError):
            return False

    @classmethod
    def from_feature_data(cls, data, source: str = "") -> FeatureBank:
        """From a :class:`saesteer.features.FeatureData` (bundled, computed, or a tiny test fixture's)."""
        t = data.table
        feats = np.asarray(data.features, dtype=np.int64)
        lens_rows = {int(f): i for i, f in enumerate(data.lens.features)}
        top_ids = np.asarray(data.lens.top_ids, dtype=np.int64)[[lens_rows[int(f)] for f in feats]]
        if data.has_contexts:
            n_keep = data.ctx_tokens.shape[1]
            pos = data.ctx_pos.astype(np.int64)  # (n, N)
            peak = np.take_along_axis(data.ctx_tokens.astype(np.int64), pos[:, :, None], axis=2)[:, :, 0]
            n_ctx = t["n_contexts"].to_numpy(np.int64)
            filled = np.arange(n_keep)[None, :] < np.minimum(n_ctx, n_keep)[:, None]
            peak = np.where(filled, peak, -1)
            acts = np.where(filled, data.ctx_act.astype(np.float64), np.nan)
        else:
            peak = np.full((len(feats), 0), -1, np.int64)
            acts = np.full((len(feats), 0), np.nan)
            n_ctx = np.zeros(len(feats), np.int64)
        density = t["density"].to_numpy(float) if "density" in t.columns else np.full(len(feats), np.nan)
        return cls(feats, top_ids, t["output_score"].to_numpy(float), t["input_score"].to_numpy(float), density,
                   peak, acts, n_ctx, source)

    def firing_share(self, token_ids: Sequence[int], max_contexts: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per feature: (share of its top contexts, up to ``max_contexts``, whose peak token is in ``token_ids``;
        contexts counted; mean peak activation over those concept contexts, NaN without any)."""
        peak = self.peak_ids[:, :max_contexts]
        acts = self.peak_acts[:, :max_contexts]
        counted = (peak >= 0).sum(axis=1)
        hit = np.isin(peak, np.asarray(list(token_ids), dtype=np.int64)) & (peak >= 0)
        n_hit = hit.sum(axis=1)
        share = np.where(counted > 0, n_hit / np.maximum(counted, 1), 0.0)
        with np.errstate(invalid="ignore"):
            mean_act = np.where(n_hit > 0, np.nansum(np.where(hit, acts, 0.0), axis=1) / np.maximum(n_hit, 1), np.nan)
        return share, counted, mean_act


@dataclass(frozen=True)
class Candidate:
    """One candidate feature of a concept."""

    feature: int
    input_score: float
    output_score: float
    density: float
    firing_share: float
    """Share of the feature's counted top contexts whose peak token is a concept token."""
    input_side: bool
    """Fires on the concept (firing share >= theta)."""
    output_side: bool
    """Promotes the concept (a concept token among its top-k logit-lens tokens)."""
    concept_activation: float = math.nan
    """Mean peak activation over the concept contexts (NaN without any)."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ConceptCandidates:
    """A concept's candidates and picks (see the module docstring)."""

    concept: str
    token_ids: tuple[int, ...]
    input_side: tuple[Candidate, ...]
    """Best firing share first."""
    output_side: tuple[Candidate, ...]
    """Highest output score first."""
    activation_pick: Candidate | None
    output_pick: Candidate | None
    random_pick: Candidate | None
    filtered: tuple[Candidate, ...]
    """Input-side candidates with output score >= tau, best firing share first."""
    params: CandidateParams

    @property
    def union(self) -> tuple[Candidate, ...]:
        """Every candidate once, by feature id."""
        seen = {c.feature: c for c in (*self.input_side, *self.output_side)}
        return tuple(seen[f] for f in sorted(seen))

    @property
    def kinds(self) -> dict[str, int]:
        """How many candidates of each kind the concept has."""
        return {"input_side": len(self.input_side), "output_side": len(self.output_side), "both": sum(c.output_side for c in self.input_side),
                "filtered": len(self.filtered)}

    def picks(self) -> dict[str, int]:
        """Method name -> feature, for the picks that exist."""
        out = {}
        for name, c in (("activation_pick", self.activation_pick), ("output_pick", self.output_pick), ("random_pick", self.random_pick)):
            if c is not None:
                out[name] = c.feature
        return out


def _key_best(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, -np.inf)


def concept_candidates(concept: str, token_ids: Sequence[int], bank: FeatureBank, params: CandidateParams = CandidateParams()) -> ConceptCandidates:
    """Candidates and picks of ``concept`` (whose token ids are ``token_ids``) in ``bank``."""
    ids = np.asarray(sorted({int(t) for t in token_ids}), dtype=np.int64)
    n = len(bank.features)
    if len(ids) == 0:
        return ConceptCandidates(concept, (), (), (), None, None, None, (), params)
    if bank.top_ids.shape[1] < params.top_k:
        raise ConfigError(f"the feature data has {bank.top_ids.shape[1]} logit-lens tokens per feature, candidates need top_k={params.top_k}")
    share, counted, mean_act = bank.firing_share(ids, params.max_contexts) if bank.peak_ids.shape[1] else (np.zeros(n), np.zeros(n, np.int64), np.full(n, np.nan))
    enough = np.minimum(bank.n_contexts, params.max_contexts) >= params.min_contexts
    in_side = enough & (counted > 0) & (share >= params.theta - 1e-12)
    out_side = np.isin(bank.top_ids[:, : params.top_k], ids).any(axis=1)

    def cand(i: int) -> Candidate:
        return Candidate(int(bank.features[i]), float(bank.input_score[i]), float(bank.output_score[i]), float(bank.density[i]),
                         float(share[i]), bool(in_side[i]), bool(out_side[i]), float(mean_act[i]))

    in_rows = np.flatnonzero(in_side)
    # best firing share first, then the higher concept activation, then the lowest id (lexsort: last key first)
    in_rows = in_rows[np.lexsort((bank.features[in_rows], -np.nan_to_num(mean_act[in_rows], nan=-np.inf), -share[in_rows]))]
    out_rows = np.flatnonzero(out_side)
    out_rows = out_rows[np.lexsort((bank.features[out_rows], -_key_best(bank.output_score[out_rows])))]
    input_c = tuple(cand(i) for i in in_rows)
    output_c = tuple(cand(i) for i in out_rows)
    union_rows = np.flatnonzero(in_side | out_side)  # ascending feature id
    activation_pick = input_c[0] if input_c else None
    output_pick = None
    if len(union_rows) and np.isfinite(bank.output_score[union_rows]).any():
        vals = _key_best(bank.output_score[union_rows])
        output_pick = cand(int(union_rows[int(np.argmax(vals))]))  # argmax: first (lowest id) of ties
    random_pick = None
    if len(union_rows):
        rng = np.random.default_rng([params.seed, zlib.crc32(concept.encode())])
        random_pick = cand(int(union_rows[rng.integers(len(union_rows))]))
    filtered = tuple(c for c in input_c if math.isfinite(c.output_score) and c.output_score >= params.tau)
    return ConceptCandidates(concept, tuple(int(t) for t in ids), input_c, output_c, activation_pick, output_pick, random_pick, filtered, params)


def candidates_for(concepts: Sequence[str], tokenizer, bank: FeatureBank, params: CandidateParams = CandidateParams()) -> list[ConceptCandidates]:
    """:func:`concept_candidates` of each concept, its token ids from ``tokenizer``."""
    return [concept_candidates(c, concept_token_ids(tokenizer, c), bank, params) for c in concepts]


def candidate_table(items: Sequence[ConceptCandidates]):
    """One row per concept: candidate counts of each kind and the picks' feature, firing share and scores."""
    import pandas as pd

    rows = []
    for cc in items:
        row = {"concept": cc.concept, "n_tokens": len(cc.token_ids), **{f"n_{k}": v for k, v in cc.kinds.items()}}
        for name in ("activation_pick", "output_pick", "random_pick"):
            c = getattr(cc, name)
            row[name] = c.feature if c else None
            row[f"{name}_output_score"] = c.output_score if c else math.nan
            row[f"{name}_firing_share"] = c.firing_share if c else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
