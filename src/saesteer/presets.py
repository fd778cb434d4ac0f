"""Fluent defaults: the default steering strength, the lab's default feature and the demo presets, picked by
code: from a preset search of the loaded weights, else from the shipped evaluation results, else a measured
per-feature calibration.

- **The preset search** (``python -m saesteer presets``; shipped under ``assets/presets/`` for the bundled
  SAEs, read only when its model and SAE fingerprints and its setting match): candidates are concepts whose
  output pick's top logit-lens word is the concept itself (the concept list first, then the top words of the
  highest output scores), calibrated in order until ``N_PRESETS`` pass; the passes are the presets, each at its
  calibrated amp. Where none passes, the page offers no preset and says why.
- **From the evaluation** (a run under ``assets/eval/results/`` or the cache whose model and SAE fingerprints
  match the loaded weights): the layer's default amp is the evaluation's best amp for the output-score pick
  (``evaluation.best_strength`` over its train rows, all concepts pooled); without a preset search, the presets
  are the concepts where the output pick's test texts mention the concept more often than the unsteered model's
  do and stay fluent (mean fluency >= ``duel.FLUENT``), best combined score first, each at the amp the
  evaluation chose for it.
- **Calibration** (a feature's own default amp, and the fallback presets): the smallest amp of
  ``CALIBRATION_GRID`` at which its continuation of the neutral prompt mentions the feature's top logit-lens
  word while the unsteered continuation of the same seed does not, and stays fluent by the duel's own measure
  (``duel.score``: fluency >= ``duel.FLUENT``, i.e. (1 − bigram repetition) × the perplexity factor against the
  unsteered continuation, so word salad that merely contains the word does not count, and repetition <= 0.5)
  for at least ``MIN_SEEDS_OK`` of the ``CALIBRATION_SEEDS``, the first (the pages' default seed) among them. A screening batch per seed (the unsteered row +
  one row per grid amp) finds the amps; each, smallest first, is then checked as the lab decodes it (one 2-row
  batch per seed, :func:`lab_samples`), because on the bf16 copy the same seed can sample another continuation
  in a batch of another shape. All on the path the duel and the lab start with: the paper's temperature 0.7,
  ``LIVE_NEW_TOKENS`` (32) new tokens, and the bf16 fast-decode copy on a CPU, the exact model on CUDA
  (``steering.default_fast``).

Every preset (and the lab's default feature) has a top logit-lens token that is a word of at least four
letters. Nothing here imports Streamlit.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .baselines import mention_pattern
from .config import LIVE_NEW_TOKENS, NEUTRAL_PROMPT, PAPER_TEMPERATURE, ConfigError, SteerParams
from .duel import FLUENT, score
from .evaluation import best_strength, default_concepts, eval_roots, repetition
from .evaluation.candidates import FeatureBank, candidates_for
from .models import LoadedModel
from .saes import LoadedSae
from .steering import default_fast, generate, generate_pair
from .text import whole_word

CALIBRATION_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Amps tried, smallest first; with the unsteered row, one batch of 7 rows per feature (<= steering.FAST_MAX_BATCH)."""
CALIBRATION_TOKENS = LIVE_NEW_TOKENS
"""New tokens per calibration row: as many as the duel and the lab start with."""
CALIBRATION_SEEDS = (0, 1, 2)
"""Seeds each grid amp is sampled with (seed 0 is the pages' default)."""
MIN_SEEDS_OK = 2
"""An amp is the default when at least this many of the seeds say the word fluently at it."""
MAX_REPETITION = 0.5
"""The evaluation's word-bigram repetition at or below which a text counts as not looping."""
FALLBACK_STRENGTH = 2.0
"""Used only when no grid amp says the word fluently: the paper's median best factor on Gemma-2-2B."""
N_PRESETS = 4
OUTPUT_METHODS = ("sae_output", "output_pick")
"""Names the evaluation gives the output-score pick (older and newer result layouts)."""


def top_word(token: str) -> str | None:
    """The normalised word of a logit-lens token (leading space / '▁' dropped, lower-cased), or None when it is
    not a word of at least four (Latin) letters: what a demo audience reads as a word, not a fragment."""
    word = token.replace("▁", " ").strip().lower()
    return word if len(word) >= 4 and re.fullmatch(r"[a-z]+", word) else None


def mentions_word(text: str, word: str) -> int:
    """How often ``word`` occurs in ``text`` as a whole word, case-insensitively."""
    return len(whole_word(word).findall(text.lower()))


@dataclass(frozen=True)
class Preset:
    concept: str
    feature: int
    """The concept's output-score pick."""
    word: str
    """The feature's top logit-lens word."""
    strength: float | None
    """Paper-mode amp; None until calibrated (fallback presets are calibrated on first use)."""
    evidence: str
    """Why it is a preset, in plain words."""


@dataclass(frozen=True)
class Defaults:
    """What the duel and the lab start from at one SAE."""

    source: str
    """'search' (the preset search of these weights), 'evaluation' (its results for these weights) or
    'calibration' (the fallback)."""
    reason: str
    """Where the defaults come from, in plain words."""
    strength: float | None
    """The layer's default amp (evaluation); None when each feature is calibrated."""
    presets: tuple[Preset, ...]
    run: Path | None = None
    tried: tuple = ()
    """The preset search's candidates (:class:`Tried`, these weights): a feature measured there keeps its own result."""
    strength_reason: str = ""
    """Where ``strength`` comes from, when ``reason`` speaks of the presets (empty: ``reason`` says it)."""


# ---------------------------------------------------------------------------------------------------
# Shipped results


def run_metas(roots: Sequence[Path] | None = None) -> list[Path]:
    """The meta.json of every evaluation run folder under ``roots`` (default: ``eval_roots()``), in the order
    :func:`find_run` reads them: ROOT/MODEL/SAE/meta.json, then ROOT/SAE/meta.json."""
    out = []
    for root in roots if roots is not None else eval_roots():
        out += sorted(Path(root).glob("*/*/meta.json")) + sorted(Path(root).glob("*/meta.json"))
    return out


def find_run(lm: LoadedModel, sae: LoadedSae, roots: Sequence[Path] | None = None) -> tuple[Path | None, str]:
    """The evaluation run for these weights (meta.json's model and SAE fingerprints match), or None and why not."""
    from .store import model_fingerprint, sae_fingerprint

    stale = []
    for meta_path in run_metas(roots):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("sae_id") != sae.id:
            continue
        if meta.get("sae_fingerprint") != sae_fingerprint(sae) or meta.get("model_fingerprint") != model_fingerprint(lm):
            stale.append(meta_path.parent)
            continue
        if (meta_path.parent / "summary.csv").exists() and (meta_path.parent / "generations.parquet").exists():
            return meta_path.parent, f"the evaluation run in {meta_path.parent}"
    if stale:
        return None, f"the shipped evaluation of {sae.id} ({stale[0]}) was run on other weights (an earlier bundle)"
    return None, f"no evaluation of {sae.id} is shipped or cached yet"


def _word_of(bank: FeatureBank, tokenizer, feature: int) -> str | None:
    tid = int(bank.top_ids[bank.row(feature), 0])
    return top_word(tokenizer.convert_ids_to_tokens(tid))


def from_results(run: Path, bank: FeatureBank, tokenizer, n: int = N_PRESETS) -> tuple[float, tuple[Preset, ...]]:
    """(layer default amp, presets) from an evaluation run (see the module docstring)."""
    summary = pd.read_csv(run / "summary.csv")
    gens = pd.read_parquet(run / "generations.parquet", columns=["concept", "method", "strength", "split", "combined"])
    method = next((m for m in OUTPUT_METHODS if (summary["method"] == m).any()), None)
    if method is None:
        raise ConfigError(f"the evaluation run {run} has no output-pick rows (methods: {sorted(summary['method'].unique())})")
    train = gens[(gens["method"] == method) & (gens["split"] == "train")]
    amp = best_strength(train) if len(train) else float(summary.loc[summary["method"] == method, "strength"].median())
    out = summary[summary["method"] == method].set_index("concept")
    base = summary[summary["method"] == "unsteered"].set_index("concept")["concept_score"]
    rows = out.assign(gain=out["concept_score"] - base.reindex(out.index).fillna(0.0))
    # the output pick mentioned the concept more than the unsteered model did, and its text stayed fluent
    rows = rows[(rows["gain"] > 0) & (rows["feature"] >= 0) & (rows["fluency"] >= FLUENT)].sort_values(["combined", "gain"], ascending=False, kind="stable")
    presets, seen = [], set()
    for concept, r in rows.iterrows():
        feature = int(r["feature"])
        try:
            word = _word_of(bank, tokenizer, feature)
        except KeyError:
            continue
        if word is None or word in seen:
            continue
        seen.add(word)
        ev = (f"in the evaluation, steering with it at amp {r['strength']:g} mentioned “{concept}” in {r['concept_score']:.0%} of "
              f"test texts (unsteered: {base.get(concept, 0.0):.0%}), fluency {r['fluency']:.2f}")
        presets.append(Preset(str(concept), feature, word, float(r["strength"]), ev))
        if len(presets) == n:
            break
    return float(amp), tuple(presets)


def fallback_presets(bank: FeatureBank, tokenizer, concepts: Sequence[str] | None = None, n: int = N_PRESETS) -> tuple[Preset, ...]:
    """Concepts of the concept list whose output pick's top logit-lens token is the concept itself (or its
    plural), by the pick's output score (:func:`search_candidates` without the extra words), uncalibrated: the
    feature then says the concept when turned up, and the preset shows what it should."""
    out = []
    for concept, f, word, output_score in search_candidates(bank, tokenizer, concepts, pool=0)[:n]:
        ev = (f"not from an evaluation of these weights: feature {f}, the concept's output pick (output score "
              f"{output_score:.2f}), has “{word}” as its top logit-lens token")
        out.append(Preset(concept, f, word, None, ev))
    return tuple(out)


def defaults(lm: LoadedModel, sae: LoadedSae, bank: FeatureBank, roots: Sequence[Path] | None = None,
             preset_roots: Sequence[Path] | None = None) -> Defaults:
    """The defaults at ``sae``. Presets: from its finished preset search (:func:`load_search`, shipped for the
    bundled SAEs) when one matches these weights, else from its evaluation run, else the fallback. The layer's
    default amp for any other feature: the evaluation's, when a run matches, else per-feature calibration."""
    run, why = find_run(lm, sae, roots)
    amp, from_eval, amp_why = None, (), ""
    if run is not None:
        try:
            amp, from_eval = from_results(run, bank, lm.tokenizer)
            amp_why = f"from {why}: the output pick's best amp at layer {sae.layer} is {amp:g}"
            if not from_eval:
                why = f"{why} shows no concept where the output pick beat the unsteered model"
        except (ConfigError, KeyError, ValueError, OSError) as exc:
            run, why = None, f"{why} could not be read ({exc})"
    found = load_search(lm, sae, preset_roots)
    if found is not None:
        amps = f"; other features: the evaluation's best amp {amp:g}" if amp is not None else "; other features: calibrated one by one"
        if found.presets:
            return Defaults("search", f"presets from the preset search of these weights: {found.summary()}{amps}", amp, found.presets, run,
                            found.tried, amp_why)
        return Defaults("search", f"no preset at layer {sae.layer}: {found.summary()}{amps}", amp, (), run, found.tried, amp_why)
    if from_eval:
        return Defaults("evaluation", amp_why, amp, from_eval, run)
    return Defaults("calibration", f"calibrated per feature ({why})", None, fallback_presets(bank, lm.tokenizer))


# ---------------------------------------------------------------------------------------------------
# Calibration


@dataclass(frozen=True)
class Sample:
    """One continuation as the lab shows it: the unsteered and the steered row of one 2-row batch, one seed."""

    seed: int
    baseline: str
    text: str
    mentions: int
    """How often the steered text says the word (whole word, any case)."""
    baseline_mentions: int
    """How often the unsteered text of the same seed says it."""
    repetition: float
    """The evaluation's word-bigram repetition of the steered text."""
    fluency: float
    """The duel's fluency of the steered text against the unsteered one."""

    @property
    def ok(self) -> bool:
        return said_by_steering(self.mentions, self.baseline_mentions, self.repetition, self.fluency)

    def line(self) -> str:
        return (f"seed {self.seed}: says it {self.mentions}× (unsteered: {self.baseline_mentions}×), repetition "
                f"{self.repetition:.2f}, fluency {self.fluency:.2f}")


def said_by_steering(mentions: int, baseline_mentions: int, rep: float, flu: float) -> bool:
    """The per-sample target: the steered text mentions the word while the unsteered one (same seed) does not,
    its word-bigram repetition is at most ``MAX_REPETITION`` and its fluency at least the duel's ``FLUENT``."""
    return mentions >= 1 and baseline_mentions == 0 and rep <= MAX_REPETITION and flu >= FLUENT


@dataclass(frozen=True)
class Calibration:
    feature: int
    word: str
    strength: float
    ok: bool
    """Whether some grid amp met the target in the lab's own batch shape (else ``strength`` is the fallback)."""
    texts: dict[float, str]
    """Grid amp -> the continuation it produced with the first seed (the screening batch)."""
    fluency: dict[float, float] = field(default_factory=dict)
    """Grid amp -> the duel's fluency figure of that continuation (1 = as fluent as the unsteered one)."""
    n_ok: dict[float, int] = field(default_factory=dict)
    """Grid amp -> how many of the seeds said the word fluently there, in the screening batch."""
    n_seeds: int = 1
    verified: dict[float, int] = field(default_factory=dict)
    """Amp -> how many seeds met the target in the lab's 2-row batch (only the amps the screen passed)."""
    samples: tuple[Sample, ...] = ()
    """The lab-shape samples at ``strength`` (or at the last amp verified, when none met the target)."""

    def describe(self) -> str:
        grid = ", ".join(f"{a:g}" for a in self.texts)
        if self.ok:
            return (f"amp {self.strength:g}: the smallest of {grid} at which feature {self.feature} says “{self.word}” (which the "
                    f"unsteered text does not) and stays fluent (the duel's fluency >= {FLUENT:g}, repetition <= {MAX_REPETITION:g}) in "
                    f"{self.verified.get(self.strength, 0)} of {self.n_seeds} samples, the default seed's among them, as the lab decodes them")
        return f"amp {self.strength:g}: " + _no_amp(grid, self.feature, self.word, self.n_seeds)


def _no_amp(grid: str, feature: int, word: str, n_seeds: int) -> str:
    return (f"no amp of {grid} made feature {feature} say “{word}” fluently in {MIN_SEEDS_OK} of {n_seeds} samples "
            f"(the paper's median factor instead)")


_CACHE: dict[tuple, Calibration] = {}
_CACHE_LOCK = threading.Lock()


def calibrate(
    lm: LoadedModel, sae: LoadedSae, features: Sequence[int], words: Sequence[str], *, prompt: str = NEUTRAL_PROMPT,
    seed: int = 0, grid: Sequence[float] = CALIBRATION_GRID, max_new_tokens: int = CALIBRATION_TOKENS, fast: bool | None = None,
) -> list[Calibration]:
    """Each feature's default amp (see the module docstring). Per feature and seed, a screening batch of
    1 + len(grid) rows (unsteered, then each amp) and one perplexity pass; then, smallest first, each amp the
    screen passed is checked as the lab decodes it (:func:`lab_samples`: a 2-row batch per seed) until one
    meets the target there. On the bf16 fast-decode copy when ``fast`` (default: as the pages start,
    ``steering.default_fast``); results are cached per process (per SAE weights)."""
    from .store import sae_fingerprint

    if len(features) != len(words):
        raise ConfigError(f"{len(features)} features but {len(words)} words: give one word per feature")
    fast = default_fast(lm) if fast is None else bool(fast)
    fp = sae_fingerprint(sae)
    keys = [(fp, int(f), w, prompt, seed, tuple(grid), max_new_tokens, fast) for f, w in zip(features, words)]
    with _CACHE_LOCK:
        todo = [i for i, k in enumerate(keys) if k not in _CACHE]
    for i in todo:
        cal = _measure(lm, sae, int(features[i]), words[i], prompt, seed, grid, max_new_tokens, fast)
        with _CACHE_LOCK:
            _CACHE[keys[i]] = cal
    with _CACHE_LOCK:
        return [_CACHE[k] for k in keys]


def lab_samples(lm: LoadedModel, sae: LoadedSae, feature: int, word: str, amp: float, *, prompt: str = NEUTRAL_PROMPT,
                seeds: Sequence[int] = CALIBRATION_SEEDS, max_new_tokens: int = CALIBRATION_TOKENS, fast: bool | None = None,
                need: int | None = None) -> list[Sample]:
    """What the lab shows at ``amp``: per seed one 2-row batch (unsteered + steered, ``steering.generate_pair``,
    exactly what ``stream_pair`` streams) at the paper's temperature, each scored with the duel's measures.
    With ``need``, stops as soon as the amp cannot pass any more (:func:`passes`)."""
    fast = default_fast(lm) if fast is None else bool(fast)
    out: list[Sample] = []
    for k, sd in enumerate(seeds):
        if need is not None and ((out and not out[0].ok) or sum(x.ok for x in out) + len(seeds) - k < need):
            break
        params = SteerParams(features=(int(feature),), strengths=(float(amp),), max_new_tokens=max_new_tokens,
                             temperature=PAPER_TEMPERATURE, seed=int(sd))
        base, text = generate_pair(lm, sae, prompt, params, fast=fast)
        flu = score(lm, prompt, word, {"baseline": base, "steered": text})["steered"].fluency
        out.append(Sample(int(sd), base, text, mentions_word(text, word), mentions_word(base, word), repetition(text), flu))
    return out


def passes(samples: Sequence[Sample], need: int) -> bool:
    """An amp passes in the lab's shape when at least ``need`` samples meet the target, the first seed's (the
    pages' default seed) among them: what a user sees on opening the page must say the word."""
    return bool(samples) and samples[0].ok and sum(x.ok for x in samples) >= need


def _measure(lm: LoadedModel, sae: LoadedSae, feature: int, word: str, prompt: str, seed: int, grid: Sequence[float],
             max_new_tokens: int, fast: bool) -> Calibration:
    """Screen: per seed one batch, the unsteered row then one row per grid amp (every row sampled from that
    seed). Then check the passing amps, smallest first, in the lab's 2-row shape."""
    amps = [float(a) for a in grid]
    seeds = [seed + k for k in CALIBRATION_SEEDS]
    s = torch.tensor([[0.0]] + [[a] for a in amps], dtype=torch.float32)
    n_ok = {a: 0 for a in amps}
    shown: tuple[dict[float, str], dict[float, float]] = ({}, {})  # the first seed's texts and fluency
    need = min(MIN_SEEDS_OK, len(seeds))
    for k, sd in enumerate(seeds):
        if k and all(n_ok[a] + len(seeds) - k < need for a in amps):
            break  # no amp can reach ``need`` any more: the remaining seeds would not change the answer
        texts = generate(lm, [prompt] * len(s), sae=sae, features=[feature], strengths=s, max_new_tokens=max_new_tokens,
                         temperature=PAPER_TEMPERATURE, seed=[sd] * len(s), fast=fast)
        stats = score(lm, prompt, word, {"baseline": texts[0], **{f"amp {a:g}": t for a, t in zip(amps, texts[1:])}})
        by_amp = dict(zip(amps, texts[1:]))
        flu = {a: stats[f"amp {a:g}"].fluency for a in amps}
        base_hits = mentions_word(texts[0], word)
        for a in amps:
            n_ok[a] += said_by_steering(mentions_word(by_amp[a], word), base_hits, stats[f"amp {a:g}"].repetition, flu[a])
        if sd == seeds[0]:
            shown = (by_amp, flu)
    verified: dict[float, int] = {}
    samples: tuple[Sample, ...] = ()
    for a in sorted(a for a in amps if n_ok[a] >= need):
        samples = tuple(lab_samples(lm, sae, feature, word, a, prompt=prompt, seeds=seeds, max_new_tokens=max_new_tokens, fast=fast, need=need))
        verified[a] = sum(x.ok for x in samples)
        if passes(samples, need):
            return Calibration(feature, word, a, True, *shown, n_ok, len(seeds), verified, samples)
    return Calibration(feature, word, FALLBACK_STRENGTH, False, *shown, n_ok, len(seeds), verified, samples)


# ---------------------------------------------------------------------------------------------------
# Search: presets found by calibration, written once per SAE (``python -m saesteer presets``)

SEARCH_FORMAT = 1
SEARCH_TRIES = 120
"""Candidates calibrated per SAE at most (each costs 2-6 short batches)."""
SEARCH_POOL: int | None = None
"""Features of the highest output score whose top word joins the concept list as a candidate concept (None: every
feature)."""


@dataclass(frozen=True)
class Tried:
    """One candidate of the search: a concept, its output pick (whose top word is the concept), the outcome."""

    concept: str
    feature: int
    word: str
    output_score: float
    ok: bool
    strength: float
    n_ok: dict[float, int]
    verified: dict[float, int]
    samples: tuple[Sample, ...] = ()

    def to_json(self) -> dict:
        return {"concept": self.concept, "feature": self.feature, "word": self.word, "output_score": self.output_score, "ok": self.ok,
                "strength": self.strength, "n_ok": {f"{a:g}": n for a, n in self.n_ok.items()},
                "verified": {f"{a:g}": n for a, n in self.verified.items()}, "samples": [vars(x) for x in self.samples]}

    @classmethod
    def from_json(cls, d: dict) -> Tried:
        return cls(str(d["concept"]), int(d["feature"]), str(d["word"]), float(d["output_score"]), bool(d["ok"]), float(d["strength"]),
                   {float(a): int(n) for a, n in d["n_ok"].items()}, {float(a): int(n) for a, n in d["verified"].items()},
                   tuple(Sample(**x) for x in d.get("samples", ())))

    @classmethod
    def of(cls, concept: str, output_score: float, cal: Calibration) -> Tried:
        return cls(concept, cal.feature, cal.word, output_score, cal.ok, cal.strength, dict(cal.n_ok), dict(cal.verified), cal.samples)

    def amp(self, n_seeds: int) -> tuple[float, str]:
        """(amp, why) of this feature as the search measured it: its calibrated amp, else the fallback."""
        if self.ok:
            return self.strength, self.preset(n_seeds).evidence
        grid = ", ".join(f"{a:g}" for a in self.n_ok)
        return FALLBACK_STRENGTH, f"amp {FALLBACK_STRENGTH:g}: the preset search of these weights tried feature {self.feature}: " + _no_amp(
            grid, self.feature, self.word, n_seeds)

    def preset(self, n_seeds: int) -> Preset:
        ev = (f"calibrated on these weights: at amp {self.strength:g} feature {self.feature} (output score {self.output_score:.2f}) "
              f"said “{self.word}” in {self.verified.get(self.strength, 0)} of {n_seeds} samples of the lab, seed 0 among them (neutral prompt, "
              f"temperature {PAPER_TEMPERATURE:g}, {CALIBRATION_TOKENS} tokens) where the unsteered text did not, without looping "
              f"(repetition <= {MAX_REPETITION:g}, fluency >= {FLUENT:g})")
        return Preset(self.concept, self.feature, self.word, self.strength, ev)


@dataclass(frozen=True)
class Search:
    """The outcome of :func:`search` at one SAE: what was tried, in order, and the presets (the passes)."""

    model: str
    sae_id: str
    model_fingerprint: str
    sae_fingerprint: str
    setting: dict
    tried: tuple[Tried, ...]
    n_candidates: int
    """Candidates there were (own-word output picks); ``len(tried)`` of them were calibrated."""
    elapsed_s: float = 0.0
    done: bool = False
    pool: int = 0
    """The features of the highest output score whose top words joined the concept list (:func:`search_candidates`)."""

    @property
    def key(self) -> tuple[str, str, dict]:
        """What must match :func:`search_key` of the loaded weights for this search to be theirs."""
        return self.model_fingerprint, self.sae_fingerprint, self.setting

    @property
    def presets(self) -> tuple[Preset, ...]:
        n = len(self.setting.get("seeds", CALIBRATION_SEEDS))
        return tuple(t.preset(n) for t in self.tried if t.ok)[:N_PRESETS]

    def goes_on(self, tries: int, pool: int | None = None) -> bool:
        """Whether a search with ``tries`` (and ``pool``) would calibrate more than this one did: it is unfinished,
        or it found fewer than ``N_PRESETS`` with a larger budget and candidates left or a larger pool."""
        short = len(self.presets) < N_PRESETS
        return not self.done or (short and len(self.tried) < min(tries, self.n_candidates)) or (
            short and pool is not None and pool > self.pool and len(self.tried) < tries)

    def summary(self) -> str:
        ok = len(self.presets)
        src = "the concept list" + (f" and the top words of the {self.pool} highest output scores" if self.pool else "")
        return (f"{ok} of the {len(self.tried)} candidates calibrated (of {self.n_candidates}: concepts from {src} whose output "
                f"pick's top logit-lens word is the concept) say their word in the lab's setting")

    def to_json(self) -> dict:
        return {"format": SEARCH_FORMAT, "model": self.model, "sae_id": self.sae_id, "model_fingerprint": self.model_fingerprint,
                "sae_fingerprint": self.sae_fingerprint, "setting": self.setting, "n_candidates": self.n_candidates, "pool": self.pool,
                "elapsed_s": self.elapsed_s, "done": self.done, "presets": [vars(p) for p in self.presets],
                "tried": [t.to_json() for t in self.tried]}

    @classmethod
    def from_json(cls, d: dict) -> Search:
        if d.get("format") != SEARCH_FORMAT:
            raise ConfigError(f"preset search format {d.get('format')!r} is not {SEARCH_FORMAT}: run `python -m saesteer presets` again")
        return cls(d["model"], d["sae_id"], d["model_fingerprint"], d["sae_fingerprint"], dict(d["setting"]),
                   tuple(Tried.from_json(t) for t in d["tried"]), int(d["n_candidates"]), float(d.get("elapsed_s", 0.0)), bool(d.get("done")),
                   int(d["pool"]))


def search_setting(lm: LoadedModel, fast: bool | None = None) -> dict:
    """What a search's samples depend on besides the weights; a file made in another setting is not read."""
    return {"prompt": NEUTRAL_PROMPT, "temperature": PAPER_TEMPERATURE, "max_new_tokens": CALIBRATION_TOKENS,
            "seeds": list(CALIBRATION_SEEDS), "grid": list(CALIBRATION_GRID), "min_seeds_ok": MIN_SEEDS_OK, "first_seed_ok": True, "fluent": FLUENT,
            "max_repetition": MAX_REPETITION, "fast": default_fast(lm) if fast is None else bool(fast)}


def search_key(lm: LoadedModel, sae: LoadedSae) -> tuple[str, str, dict]:
    """(model fingerprint, SAE fingerprint, setting): a search is these weights' in the pages' setting when its
    :attr:`Search.key` equals this."""
    from .store import model_fingerprint, sae_fingerprint

    return model_fingerprint(lm), sae_fingerprint(sae), search_setting(lm)


def search_candidates(bank: FeatureBank, tokenizer, concepts: Sequence[str] | None = None, pool: int | None = SEARCH_POOL) -> list[tuple[str, int, str, float]]:
    """(concept, output pick, its top word, output score) for every concept whose output pick's top logit-lens
    token is the concept's own word. Concepts: the concept list first (``assets/eval/concepts.txt``), then the
    top word of each of the ``pool`` features of the highest output score (None: every feature), when that token starts a word. Each
    group by output score, highest first; one candidate per feature and per word."""
    base = list(concepts if concepts is not None else default_concepts())
    order = np.argsort(-np.nan_to_num(bank.output_score, nan=-np.inf), kind="stable")[:pool]
    extra = []
    for i in order:
        token = tokenizer.convert_ids_to_tokens(int(bank.top_ids[i, 0]))
        w = top_word(token)
        if w is not None and token[:1] in ("▁", " ") and w not in extra:
            extra.append(w)
    out, seen_f, seen_w = [], set(), set()
    for group in (base, [w for w in extra if w not in {c.strip().lower() for c in base}]):
        picks = []
        for c in candidates_for(group, tokenizer, bank):
            if c.output_pick is None or not math.isfinite(c.output_pick.output_score):
                continue
            w = _word_of(bank, tokenizer, c.output_pick.feature)
            if w is not None and mention_pattern(c.concept).fullmatch(w):
                picks.append((c.concept, int(c.output_pick.feature), w, float(c.output_pick.output_score)))
        for item in sorted(picks, key=lambda t: (-t[3], t[0])):
            if item[1] not in seen_f and item[2] not in seen_w:
                seen_f.add(item[1])
                seen_w.add(item[2])
                out.append(item)
    return out


def search_pool(pool: int | None, n_features: int) -> int:
    """The pool a search with ``pool`` (None: every feature) uses on an SAE of ``n_features`` features, as
    :attr:`Search.pool` records it."""
    if pool is not None and pool < 0:
        raise ConfigError(f"the candidate pool must be 0 (the concept list only) or more features, got {pool}")
    return n_features if pool is None else min(int(pool), n_features)


def search(lm: LoadedModel, sae: LoadedSae, bank: FeatureBank, *, concepts: Sequence[str] | None = None, tries: int = SEARCH_TRIES,
           n: int = N_PRESETS, pool: int | None = SEARCH_POOL, resume: Search | None = None, checkpoint=None, progress=None) -> Search:
    """Calibrate the candidates (:func:`search_candidates` with ``pool``) in order until ``n`` pass or ``tries``
    were tried.
    ``resume``: an earlier, unfinished search of these weights in this setting (its tried candidates are kept);
    ``checkpoint(search)`` is called after every candidate (the CLI writes the file there); ``progress(i, total,
    tried)`` likewise, for a progress bar."""
    t0 = time.perf_counter()
    key = search_key(lm, sae)
    pool = search_pool(pool, len(bank.output_score))
    cands = search_candidates(bank, lm.tokenizer, concepts, pool)
    tried: list[Tried] = []
    spent = 0.0
    if resume is not None and resume.key == key:
        tried, spent = list(resume.tried), resume.elapsed_s
    done_f = {t.feature for t in tried}

    def current(done: bool) -> Search:
        return Search(lm.name, sae.id, *key, tuple(tried), len(cands), spent + time.perf_counter() - t0, done, pool)

    total = min(tries, len(cands))
    for concept, f, w, os_ in cands:
        if sum(t.ok for t in tried) >= n or len(tried) >= total:
            break
        if f in done_f:
            continue
        cal = calibrate(lm, sae, [f], [w])[0]
        tried.append(Tried.of(concept, os_, cal))
        if checkpoint is not None:
            checkpoint(current(False))
        if progress is not None:
            progress(len(tried), total, tried[-1])
    return current(True)


def write_search(result: Search, root: Path | None = None) -> Path:
    """Write ``result`` where :func:`load_search` reads it (default root: the bundled presets folder); atomic."""
    from .paths import BUNDLED_PRESETS, presets_file

    path = presets_file(BUNDLED_PRESETS if root is None else root, result.model, result.sae_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_search(path: Path) -> Search | None:
    """The search in ``path``, or None when there is none or it cannot be read (another format, damaged)."""
    try:
        return Search.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None


def load_search(lm: LoadedModel, sae: LoadedSae, roots: Sequence[Path] | None = None, *, finished: bool = True) -> Search | None:
    """The finished preset search of these very weights in the setting the pages start with (bundled folder
    first, then the cache), else None."""
    from .paths import BUNDLED_PRESETS, presets_cache, presets_file

    key = None
    for root in roots if roots is not None else (BUNDLED_PRESETS, presets_cache()):
        found = read_search(presets_file(root, lm.name, sae.id))
        if found is None or (finished and not found.done):
            continue
        key = search_key(lm, sae) if key is None else key
        if found.key == key:
            return found
    return None


def opening_sae(model_name: str, sae_ids: Sequence[str]) -> str | None:
    """Of ``sae_ids`` (bundled), the one whose shipped preset search found the most presets (the first on a
    tie), or None when none ships one: the layer the app opens on, so a first look starts where steering shows."""
    from .paths import BUNDLED_PRESETS, presets_file

    paths = [presets_file(BUNDLED_PRESETS, model_name, sid) for sid in sae_ids]
    key = (tuple(sae_ids), tuple(_stamp(p) for p in paths))  # the picker asks on every rerun: parse the files once
    if key not in _OPENING:
        best, most = None, 0
        for sid, path in zip(sae_ids, paths):
            found = read_search(path)
            k = len(found.presets) if found is not None and found.done else 0
            if k > most:
                best, most = sid, k
        _OPENING[key] = best
    return _OPENING[key]


_OPENING: dict[tuple, str | None] = {}


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (str(path),)
    return str(path), st.st_mtime_ns, st.st_size


def preset_strength(lm: LoadedModel, sae: LoadedSae, preset: Preset) -> tuple[float, str]:
    """(amp, why) of a preset: the evaluation's amp for it, else its calibration."""
    if preset.strength is not None:
        return preset.strength, preset.evidence
    cal = calibrate(lm, sae, [preset.feature], [preset.word])[0]
    return cal.strength, cal.describe()


def feature_strength(lm: LoadedModel, sae: LoadedSae, d: Defaults, feature: int, bank: FeatureBank) -> tuple[float, str]:
    """(amp, why) for any feature: its calibration in the preset search when the search tried it, else the layer's
    evaluated amp, else the feature's calibration on its top word (features without a word-like top token get
    the fallback amp)."""
    for t in d.tried:
        if t.feature == int(feature):
            return t.amp(len(CALIBRATION_SEEDS))
    if d.strength is not None:
        return d.strength, d.strength_reason or d.reason
    word = _word_of(bank, lm.tokenizer, feature)
    if word is None:
        return FALLBACK_STRENGTH, f"amp {FALLBACK_STRENGTH:g}: feature {feature}'s top logit-lens token is not a word to calibrate on"
    cal = calibrate(lm, sae, [feature], [word])[0]
    return cal.strength, cal.describe()


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


__all__ = [
    "CALIBRATION_GRID", "CALIBRATION_SEEDS", "Calibration", "Defaults", "Preset", "calibrate", "clear_cache", "defaults", "fallback_presets",
    "feature_strength", "find_run", "from_results", "mentions_word", "preset_strength", "run_metas", "top_word",
    "SEARCH_POOL", "SEARCH_TRIES", "Sample", "Search", "Tried", "lab_samples", "load_search", "opening_sae", "passes", "read_search",
    "said_by_steering", "search", "search_candidates", "search_key", "search_pool", "search_setting", "write_search",
]
