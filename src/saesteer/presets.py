"""Fluent defaults: the default steering strength, the lab's default feature and the demo presets, picked by
code from the shipped evaluation results, with a measured per-feature calibration while results are absent
or were computed for other weights.

- **From the evaluation** (a run under ``assets/eval/results/`` or the cache whose model and SAE fingerprints
  match the loaded weights): the layer's default amp is the evaluation's best amp for the output-score pick
  (``evaluation.best_strength`` over its train rows, all concepts pooled); the presets are the concepts where
  the output pick's test texts mention the concept more often than the unsteered model's do and stay fluent
  (mean fluency >= ``duel.FLUENT``), best combined score first, each at the amp the evaluation chose for it.
- **Fallback: calibration.** The presets are the concepts of ``assets/eval/concepts.txt`` whose output pick
  has the highest output score; a feature's default amp is the smallest amp of ``CALIBRATION_GRID`` at which
  its continuation of the neutral prompt mentions the feature's top logit-lens word and stays fluent by the
  duel's own measure (``duel.score``: fluency >= ``duel.FLUENT``, i.e. (1 − bigram repetition) × the
  perplexity factor against the unsteered continuation, so word salad that merely contains the word does not
  count) for at least ``MIN_SEEDS_OK`` of the ``CALIBRATION_SEEDS``. One sample is one draw: on the bf16 copy the
  same seed can even sample another continuation in a batch of another shape, so a default that worked for one
  draw only would be luck. Each (feature, seed) is one batch (the unsteered row + one row per grid amp) on the
  path the duel and the lab start with: the paper's temperature 0.7, ``LIVE_NEW_TOKENS`` (32) new tokens, and
  the bf16 fast-decode copy on a CPU, the exact model on CUDA (``steering.default_fast``).

Every preset (and the lab's default feature) has a top logit-lens token that is a word of at least four
letters. Nothing here imports Streamlit.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .baselines import mention_pattern
from .config import LIVE_NEW_TOKENS, NEUTRAL_PROMPT, PAPER_TEMPERATURE, ConfigError
from .duel import FLUENT, score
from .evaluation import best_strength, default_concepts, eval_roots, repetition
from .evaluation.candidates import FeatureBank, candidates_for
from .models import LoadedModel
from .saes import LoadedSae
from .steering import default_fast, generate
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
    """'evaluation' (shipped results for these weights) or 'calibration' (the fallback)."""
    reason: str
    """Where the defaults come from, in plain words."""
    strength: float | None
    """The layer's default amp (evaluation); None when each feature is calibrated."""
    presets: tuple[Preset, ...]
    run: Path | None = None


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
    """Concepts whose output pick's top logit-lens token is the concept itself (or its plural), by the pick's
    output score: the feature then says the concept when turned up, and the preset shows what it should."""
    items = candidates_for(list(concepts if concepts is not None else default_concepts()), tokenizer, bank)

    def own_word(c) -> bool:
        w = _word_of(bank, tokenizer, c.output_pick.feature)
        return w is not None and mention_pattern(c.concept).fullmatch(w) is not None

    ranked = sorted((c for c in items if c.output_pick is not None and math.isfinite(c.output_pick.output_score)),
                    key=lambda c: (-c.output_pick.output_score, c.concept))
    ranked = [c for c in ranked if own_word(c)]
    presets, seen = [], set()
    for c in ranked:
        f = c.output_pick.feature
        word = _word_of(bank, tokenizer, f)
        if word is None or word in seen or f in {p.feature for p in presets}:
            continue
        seen.add(word)
        ev = (f"not from an evaluation of these weights: feature {f}, the concept's output pick (output score "
              f"{c.output_pick.output_score:.2f}), has “{word}” as its top logit-lens token")
        presets.append(Preset(c.concept, f, word, None, ev))
        if len(presets) == n:
            break
    return tuple(presets)


def defaults(lm: LoadedModel, sae: LoadedSae, bank: FeatureBank, roots: Sequence[Path] | None = None) -> Defaults:
    """The defaults at ``sae``: from its evaluation run when one matches these weights, else the fallback."""
    run, why = find_run(lm, sae, roots)
    if run is not None:
        try:
            amp, presets = from_results(run, bank, lm.tokenizer)
            if presets:
                return Defaults("evaluation", f"from {why}: the output pick's best amp at layer {sae.layer} is {amp:g}", amp, presets, run)
            why = f"{why} shows no concept where the output pick beat the unsteered model"
        except (ConfigError, KeyError, ValueError, OSError) as exc:
            why = f"{why} could not be read ({exc})"
    return Defaults("calibration", f"calibrated per feature ({why})", None, fallback_presets(bank, lm.tokenizer))


# ---------------------------------------------------------------------------------------------------
# Calibration


@dataclass(frozen=True)
class Calibration:
    feature: int
    word: str
    strength: float
    ok: bool
    """Whether some grid amp met the target (else ``strength`` is the fallback)."""
    texts: dict[float, str]
    """Grid amp -> the continuation it produced with the first seed."""
    fluency: dict[float, float] = field(default_factory=dict)
    """Grid amp -> the duel's fluency figure of that continuation (1 = as fluent as the unsteered one)."""
    n_ok: dict[float, int] = field(default_factory=dict)
    """Grid amp -> how many of the seeds said the word fluently there."""
    n_seeds: int = 1

    def describe(self) -> str:
        grid = ", ".join(f"{a:g}" for a in self.texts)
        if self.ok:
            return (f"amp {self.strength:g}: the smallest of {grid} at which feature {self.feature} says “{self.word}” and stays "
                    f"fluent (the duel's fluency >= {FLUENT:g}) in {self.n_ok.get(self.strength, 0)} of {self.n_seeds} samples")
        return (f"amp {self.strength:g}: no amp of {grid} made feature {self.feature} say “{self.word}” fluently in "
                f"{MIN_SEEDS_OK} of {self.n_seeds} samples (the paper's median factor instead)")


_CACHE: dict[tuple, Calibration] = {}
_CACHE_LOCK = threading.Lock()


def calibrate(
    lm: LoadedModel, sae: LoadedSae, features: Sequence[int], words: Sequence[str], *, prompt: str = NEUTRAL_PROMPT,
    seed: int = 0, grid: Sequence[float] = CALIBRATION_GRID, max_new_tokens: int = CALIBRATION_TOKENS, fast: bool | None = None,
) -> list[Calibration]:
    """Each feature's default amp (see the module docstring): per feature and seed one batched generation of
    1 + len(grid) rows (unsteered, then each amp) and one perplexity pass, on the bf16 fast-decode copy when ``fast`` (default:
    as the pages start, ``steering.default_fast``); results are cached per process (per SAE weights)."""
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


def _measure(lm: LoadedModel, sae: LoadedSae, feature: int, word: str, prompt: str, seed: int, grid: Sequence[float],
             max_new_tokens: int, fast: bool) -> Calibration:
    """Per seed one batch: the unsteered row, then one row per grid amp (every row sampled from that seed)."""
    amps = [float(a) for a in grid]
    seeds = [seed + k for k in CALIBRATION_SEEDS]
    s = torch.tensor([[0.0]] + [[a] for a in amps], dtype=torch.float32)
    n_ok = {a: 0 for a in amps}
    shown: tuple[dict[float, str], dict[float, float]] = ({}, {})  # the first seed's texts and fluency
    for sd in seeds:
        texts = generate(lm, [prompt] * len(s), sae=sae, features=[feature], strengths=s, max_new_tokens=max_new_tokens,
                         temperature=PAPER_TEMPERATURE, seed=[sd] * len(s), fast=fast)
        stats = score(lm, prompt, word, {"baseline": texts[0], **{f"amp {a:g}": t for a, t in zip(amps, texts[1:])}})
        by_amp = dict(zip(amps, texts[1:]))
        flu = {a: stats[f"amp {a:g}"].fluency for a in amps}
        for a in amps:
            n_ok[a] += bool(mentions_word(by_amp[a], word) and flu[a] >= FLUENT)
        if sd == seeds[0]:
            shown = (by_amp, flu)
    return _choose(feature, word, *shown, n_ok, len(seeds))


def _choose(feature: int, word: str, texts: dict[float, str], fluency: dict[float, float], n_ok: dict[float, int],
            n_seeds: int) -> Calibration:
    for amp in sorted(texts):
        if n_ok.get(amp, 0) >= min(MIN_SEEDS_OK, n_seeds):
            return Calibration(feature, word, amp, True, texts, fluency, n_ok, n_seeds)
    return Calibration(feature, word, FALLBACK_STRENGTH, False, texts, fluency, n_ok, n_seeds)


def preset_strength(lm: LoadedModel, sae: LoadedSae, preset: Preset) -> tuple[float, str]:
    """(amp, why) of a preset: the evaluation's amp for it, else its calibration."""
    if preset.strength is not None:
        return preset.strength, preset.evidence
    cal = calibrate(lm, sae, [preset.feature], [preset.word])[0]
    return cal.strength, cal.describe()


def feature_strength(lm: LoadedModel, sae: LoadedSae, d: Defaults, feature: int, bank: FeatureBank) -> tuple[float, str]:
    """(amp, why) for any feature: the layer's evaluated amp, else the feature's calibration on its top word
    (features without a word-like top token get the fallback amp)."""
    if d.strength is not None:
        return d.strength, d.reason
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
]
