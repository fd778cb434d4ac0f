"""The concept duel: what fires on a concept vs what says it, steered side by side from one batch.

For a concept, :mod:`saesteer.evaluation.candidates` gives two picks: the *activation pick* (the input-side
candidate that fires most reliably on the concept: what activation-based search finds) and the *output pick*
(the highest output score among the candidates: what the paper recommends). One duel decodes up to three rows
of the same prompt as ONE batch: baseline | steered by the activation pick | steered by the output pick, at
the same paper-mode amp, each row with its own generator seeded alike, so every column is the text that row
gets alone. A missing pick drops its row and says why.

Each column is measured the way the evaluation measures a generation: *hits* are whole-word mentions of the
concept (``baselines.mention_pattern``, plural allowed), *fluency* is (1 − bigram repetition) × the
perplexity factor, with the baseline column's perplexity as the reference. The verdict is computed from
these numbers after the run, never written in advance.

No Streamlit here: ``saesteer.ui.pages.duel`` renders it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .baselines import mention_pattern
from .config import LIVE_NEW_TOKENS, MAX_CONCEPT_CHARS, MAX_NEW_TOKENS_LIMIT, NEUTRAL_PROMPT, PAPER_TEMPERATURE, ConfigError, SteerParams
from .evaluation import continuation_nll, ppl_factor, repetition
from .evaluation.candidates import CandidateParams, ConceptCandidates, FeatureBank, concept_candidates, concept_token_ids
from .models import LoadedModel
from .saes import LoadedSae
from .steering import stream_rows

COLUMNS = ("baseline", "activation", "output")
TITLES = {"baseline": "Baseline (no steering)", "activation": "What fires on it (activation pick)", "output": "What says it (output pick)"}
STRIP_FACTORS = (0.25, 0.5, 1.0, 2.0, 3.0)
"""The strength strip: these multiples of the duel's strength (rounded, at most ``MAX_AMP``)."""
MAX_AMP = 20.0
"""The duel's strength range is 0 … MAX_AMP (the paper's grid ends at 20)."""
STRIP_TOKENS = 12
DUEL_CANDIDATES = CandidateParams()
"""How the duel finds candidates: the evaluation's defaults."""


@dataclass(frozen=True)
class DuelParams:
    """One duel run."""

    concept: str
    """A word or short phrase (at most 64 characters)."""
    strength: float
    """Paper-mode amp, the same for both steered columns (x_last += amp · max_j a_j(x) · W_dec[f])."""
    prompt: str = NEUTRAL_PROMPT
    """The text every column continues."""
    temperature: float = PAPER_TEMPERATURE
    """0 = greedy; the paper samples at 0.7."""
    seed: int = 0
    """Every column samples from its own generator seeded with this."""
    max_new_tokens: int = LIVE_NEW_TOKENS
    """Tokens per column."""

    def __post_init__(self) -> None:
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ConfigError("the concept is empty: type a word or a short phrase, e.g. water")
        if len(self.concept) > MAX_CONCEPT_CHARS:
            raise ConfigError(f"the concept is {len(self.concept)} characters long; use at most {MAX_CONCEPT_CHARS} (a word or a short phrase)")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not math.isfinite(self.strength) or not 0 <= self.strength <= MAX_AMP:
            raise ConfigError(f"strength (amp) must be a number from 0 to {MAX_AMP:g}, got {self.strength!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be a whole number from 0 to {2**31 - 1}, got {self.seed!r}")
        self.steer_params()  # the one set of limits for temperature / max_new_tokens

    def steer_params(self, max_new_tokens: int | None = None) -> SteerParams:
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise ConfigError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got {n!r}")
        return SteerParams(max_new_tokens=n, temperature=float(self.temperature), seed=self.seed)

    def key(self, sae: str, theta: float) -> DuelKey:
        """What makes two runs the same run (the live mode restarts when it changes): these parameters, the SAE
        (``sae``: its id and weights fingerprint) and the activation pick's threshold ``theta``."""
        return DuelKey(sae, round(float(theta), 6), self.concept.strip().lower(), round(float(self.strength), 4), self.prompt,
                       float(self.temperature), self.seed, self.max_new_tokens)


class DuelKey(NamedTuple):
    """One duel run's identity (see :meth:`DuelParams.key`)."""

    sae: str
    theta: float
    concept: str
    strength: float
    prompt: str
    temperature: float
    seed: int
    max_new_tokens: int


@dataclass(frozen=True)
class DuelPlan:
    """Which columns a duel decodes, with which feature, and why a column is missing."""

    candidates: ConceptCandidates
    columns: tuple[str, ...]
    """The decoded columns, baseline first."""
    features: dict[str, int]
    """Column -> the feature it steers with (baseline has none)."""
    missing: dict[str, str] = field(default_factory=dict)
    """Column -> why it has no feature."""

    @property
    def same_feature(self) -> bool:
        """Both picks are one feature (it both fires on the concept and says it)."""
        f = self.features
        return "activation" in f and "output" in f and f["activation"] == f["output"]

    def strength_rows(self, strength: float) -> tuple[tuple[int, ...], torch.Tensor]:
        """(features, (rows, n_features) strengths): row i steers column ``columns[i]`` alone at ``strength``."""
        feats = tuple(dict.fromkeys(self.features[c] for c in self.columns if c in self.features))
        s = torch.zeros((len(self.columns), len(feats)), dtype=torch.float32)
        for i, c in enumerate(self.columns):
            if c in self.features:
                s[i, feats.index(self.features[c])] = float(strength)
        return feats, s


def candidates(lm: LoadedModel, bank: FeatureBank, concept: str, params: CandidateParams | None = None) -> ConceptCandidates:
    """The concept's candidates and picks (:mod:`saesteer.evaluation.candidates`), its tokens from ``lm``'s
    tokenizer; ``params`` default to :data:`DUEL_CANDIDATES`."""
    return concept_candidates(concept.strip(), concept_token_ids(lm.tokenizer, concept.strip()), bank, params or DUEL_CANDIDATES)


def plan(cands: ConceptCandidates) -> DuelPlan:
    """The duel's columns for ``cands``: the baseline always; each pick when it exists, else why not."""
    features: dict[str, int] = {}
    missing: dict[str, str] = {}
    if not cands.token_ids:
        reason = f"“{cands.concept}” is not one token of this model's vocabulary (nor its first token, for a phrase)"
        return DuelPlan(cands, ("baseline",), {}, {"activation": reason, "output": reason})
    if cands.activation_pick is not None:
        features["activation"] = cands.activation_pick.feature
    else:
        p = cands.params
        missing["activation"] = (f"no feature fires on “{cands.concept}”: none has at least {p.theta:.0%} of its top contexts "
                                 "peaking on the concept's tokens")
    if cands.output_pick is not None:
        features["output"] = cands.output_pick.feature
    else:
        missing["output"] = (f"no feature says “{cands.concept}”: none has the concept among its top-{cands.params.top_k} "
                             "logit-lens tokens, and no candidate has an output score")
    columns = ("baseline",) + tuple(c for c in COLUMNS[1:] if c in features)
    return DuelPlan(cands, columns, features, missing)


def stream_duel(lm: LoadedModel, sae: LoadedSae, params: DuelParams, duel: DuelPlan, *, fast: bool = False) -> Iterator[dict[str, str]]:
    """Text increments of every decoded column ({column: piece}), step by step, from ONE batch of
    ``len(duel.columns)`` rows. Closing the iterator stops the decode after the current token and removes the
    steering hook (see :func:`saesteer.steering.stream_rows`)."""
    feats, strengths = duel.strength_rows(params.strength)
    rows = stream_rows(lm, params.prompt, sae=sae, features=feats, strengths=strengths, params=params.steer_params(), fast=fast)

    def pieces() -> Iterator[dict[str, str]]:
        try:
            for step in rows:
                yield dict(zip(duel.columns, step))
        finally:
            rows.close()

    return pieces()


def strip_strengths(strength: float) -> tuple[float, ...]:
    """The strength strip's amps around ``strength`` (4–6 distinct values, rounded to 0.05, 0 excluded)."""
    base = strength if strength > 0 else 1.0
    out = sorted({min(MAX_AMP, round(base * m * 20) / 20) for m in STRIP_FACTORS} - {0.0})
    return tuple(out)


def stream_strip(
    lm: LoadedModel, sae: LoadedSae, params: DuelParams, duel: DuelPlan, strengths: Sequence[float], *, fast: bool = False,
    max_new_tokens: int = STRIP_TOKENS,
) -> Iterator[dict[tuple[str, float], str]]:
    """Short continuations of each steered column at each of ``strengths``, ONE batch of
    (steered columns × strengths) rows: {(column, strength): piece} step by step."""
    steered = [c for c in duel.columns if c in duel.features]
    if not steered or not strengths:
        return iter(())
    feats = tuple(dict.fromkeys(duel.features[c] for c in steered))
    cells = [(c, float(s)) for c in steered for s in strengths]
    rows = torch.zeros((len(cells), len(feats)), dtype=torch.float32)
    for i, (c, s) in enumerate(cells):
        rows[i, feats.index(duel.features[c])] = s
    it = stream_rows(lm, params.prompt, sae=sae, features=feats, strengths=rows, params=params.steer_params(max_new_tokens), fast=fast)

    def pieces() -> Iterator[dict[tuple[str, float], str]]:
        try:
            for step in it:
                yield dict(zip(cells, step))
        finally:
            it.close()

    return pieces()


# ---------------------------------------------------------------------------------------------------
# Measures and the verdict


def hits(text: str, concept: str) -> int:
    """Whole-word, case-insensitive mentions of the concept (plural allowed), as the evaluation counts them."""
    return len(mention_pattern(concept).findall(text))


def live_fluency(text: str) -> float:
    """The fluency figure while a column streams: 1 − share of repeated word bigrams (perplexity comes at the end)."""
    return 1.0 - repetition(text)


@dataclass(frozen=True)
class ColumnStats:
    column: str
    text: str
    hits: int
    repetition: float
    perplexity: float
    """Of the continuation under the unsteered model, given the prompt (NaN for empty text)."""
    fluency: float
    """(1 − repetition) × clip((ln 1000 − ln ppl) / (ln 1000 − ln ppl_baseline), 0, 1): 1 = as fluent as the baseline."""


def score(lm: LoadedModel, prompt: str, concept: str, texts: dict[str, str]) -> dict[str, ColumnStats]:
    """Final measures of each column (one perplexity pass for all of them, under the unsteered model)."""
    cols = list(texts)
    nll, _ = continuation_nll(lm, [prompt] * len(cols), [texts[c] for c in cols])
    ppl = {c: math.exp(v) if v == v else math.nan for c, v in zip(cols, nll)}
    ref = ppl.get("baseline", math.nan)
    if not math.isfinite(ref):
        finite = [p for p in ppl.values() if math.isfinite(p)]
        ref = min(finite) if finite else 1.0
    out = {}
    for c in cols:
        rep = repetition(texts[c])
        flu = (1.0 - rep) * ppl_factor(ppl[c], ref) if texts[c].strip() else 0.0
        out[c] = ColumnStats(c, texts[c], hits(texts[c], concept), rep, ppl[c], flu)
    return out


FLUENT = 0.5
"""Below this fluency a column counts as broken text in the verdict."""


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


def verdict(duel: DuelPlan, stats: dict[str, ColumnStats], strength: float) -> str:
    """One line, computed from what was generated: which pick steered towards the concept and stayed fluent."""
    concept = duel.candidates.concept
    a, o, b = stats.get("activation"), stats.get("output"), stats.get("baseline")
    if a is None and o is None:
        return f"No feature to compare for “{concept}”: try another concept."
    base = f" (unsteered: {_times(b.hits)})" if b is not None and b.hits else ""

    def said(s: ColumnStats) -> str:
        return f"said “{concept}” {_times(s.hits)}" if s.hits else f"never said “{concept}”"

    if duel.same_feature and a is not None:
        return f"One feature both fires on “{concept}” and says it; steered at amp {strength:g} it {said(a)}{base}, fluency {a.fluency:.2f}."
    if a is None or o is None:
        s, name = (o, "output pick") if o is not None else (a, "activation pick")
        return f"Only the {name} exists here; at amp {strength:g} it {said(s)}{base}, fluency {s.fluency:.2f}."
    good_o = o.hits > 0 and o.fluency >= FLUENT
    good_a = a.hits > 0 and a.fluency >= FLUENT
    if good_o and (o.hits > a.hits or not good_a):
        return (f"What says it steers: the output pick {said(o)} (fluency {o.fluency:.2f}), the activation pick {said(a)} "
                f"(fluency {a.fluency:.2f}){base}. Activation is not effect.")
    if good_a and (a.hits > o.hits or not good_o):
        return (f"This run goes the other way: the activation pick {said(a)} (fluency {a.fluency:.2f}), the output pick {said(o)} "
                f"(fluency {o.fluency:.2f}){base}. One sample: try another seed.")
    if good_a and good_o:
        return f"A draw: both picks said “{concept}” {_times(o.hits)} and stayed fluent{base}."
    broken = [n for n, s in (("output", o), ("activation", a)) if s.hits and s.fluency < FLUENT]
    if broken:
        return (f"The {' and '.join(broken)} pick said “{concept}” but the text broke down (fluency "
                f"{min(stats[c].fluency for c in broken):.2f}): lower the strength.")
    return f"Neither pick said “{concept}” at amp {strength:g}{base}: raise the strength or try another seed."
