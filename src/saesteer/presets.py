"""Fluent defaults: the default steering strength, the lab's default feature and the demo presets, picked by
code from the shipped evaluation results, with a measured per-feature calibration while results are absent
or were computed for other weights.

- **From the evaluation** (a run under ``assets/eval/results/`` or the cache whose model and SAE fingerprints
  match the loaded weights): the layer's default amp is the evaluation's best amp for the output-score pick
  (``evaluation.best_strength`` over its train rows, all concepts pooled); the presets are the concepts where
  the output pick's test texts mention the concept more often than the unsteered model's do, best combined
  score first, each at the amp the evaluation chose for it.
- **Fallback: calibration.** The presets are the concepts of ``assets/eval/concepts.txt`` whose output pick
  has the highest output score; a feature's default amp is the smallest amp of ``CALIBRATION_GRID`` at which
  its continuation of the neutral prompt mentions the feature's top logit-lens word with word-bigram
  repetition <= 0.5, measured in one batched generation on the path the duel and the lab start with: the
  paper's temperature 0.7, seed 0, ``LIVE_NEW_TOKENS`` (32) new tokens, and the bf16 fast-decode copy on a
  CPU, the exact model on CUDA (``steering.default_fast``).

Every preset (and the lab's default feature) has a top logit-lens token that is a word of at least four
letters. Nothing here imports Streamlit.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .baselines import mention_pattern
from .config import LIVE_NEW_TOKENS, NEUTRAL_PROMPT, PAPER_TEMPERATURE, ConfigError
from .evaluation import best_strength, default_concepts, eval_roots, repetition
from .evaluation.candidates import FeatureBank, candidates_for
from .models import LoadedModel
from .saes import LoadedSae
from .steering import default_fast, generate
from .text import whole_word

CALIBRATION_GRID = (2.0, 3.0, 4.0, 6.0)
CALIBRATION_TOKENS = LIVE_NEW_TOKENS
"""New tokens per calibration row: as many as the duel and the lab start with."""
MAX_REPETITION = 0.5
"""The evaluation's word-bigram repetition at or below which a text counts as not looping."""
FALLBACK_STRENGTH = 2.0
"""Used only when no grid amp mentions the word: the paper's median best factor on Gemma-2-2B."""
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
    rows = rows[(rows["gain"] > 0) & (rows["feature"] >= 0)].sort_values(["combined", "gain"], ascending=False, kind="stable")
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
        ev = (f"no evaluation for these weights yet: feature {f}, the concept's output pick (output score "
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
    """Grid amp -> the continuation it produced."""

    def describe(self) -> str:
        if self.ok:
            t = self.texts[self.strength]
            return (f"amp {self.strength:g}: the smallest of {', '.join(f'{a:g}' for a in self.texts)} at which feature {self.feature} "
                    f"says “{self.word}” ({mentions_word(t, self.word)}×) without looping (bigram repetition {repetition(t):.2f})")
        return f"amp {self.strength:g}: no amp of the grid made feature {self.feature} say “{self.word}” without looping"


_CACHE: dict[tuple, Calibration] = {}
_CACHE_LOCK = threading.Lock()


def calibrate(
    lm: LoadedModel, sae: LoadedSae, features: Sequence[int], words: Sequence[str], *, prompt: str = NEUTRAL_PROMPT,
    seed: int = 0, grid: Sequence[float] = CALIBRATION_GRID, max_new_tokens: int = CALIBRATION_TOKENS, fast: bool | None = None,
) -> list[Calibration]:
    """Each feature's default amp (see the module docstring): one batched generation of
    len(features) × len(grid) rows, on the bf16 fast-decode copy when ``fast`` (default: as the pages start,
    ``steering.default_fast``); results are cached per process (per SAE weights)."""
    from .store import sae_fingerprint

    if len(features) != len(words):
        raise ConfigError(f"{len(features)} features but {len(words)} words: give one word per feature")
    fast = default_fast(lm) if fast is None else bool(fast)
    fp = sae_fingerprint(sae)
    keys = [(fp, int(f), w, prompt, seed, tuple(grid), max_new_tokens, fast) for f, w in zip(features, words)]
    with _CACHE_LOCK:
        todo = [i for i, k in enumerate(keys) if k not in _CACHE]
    if todo:
        feats = [int(features[i]) for i in todo]
        uniq = list(dict.fromkeys(feats))
        cells = [(i, a) for i in todo for a in grid]
        s = torch.zeros((len(cells), len(uniq)), dtype=torch.float32)
        for r, (i, a) in enumerate(cells):
            s[r, uniq.index(int(features[i]))] = float(a)
        texts = generate(lm, [prompt] * len(cells), sae=sae, features=uniq, strengths=s, max_new_tokens=max_new_tokens,
                         temperature=PAPER_TEMPERATURE, seed=[seed] * len(cells), fast=fast)
        by: dict[int, dict[float, str]] = {}
        for (i, a), t in zip(cells, texts):
            by.setdefault(i, {})[float(a)] = t
        with _CACHE_LOCK:
            for i in todo:
                _CACHE[keys[i]] = _choose(int(features[i]), words[i], by[i])
    with _CACHE_LOCK:
        return [_CACHE[k] for k in keys]


def _choose(feature: int, word: str, texts: dict[float, str]) -> Calibration:
    for amp in sorted(texts):
        t = texts[amp]
        if mentions_word(t, word) and repetition(t) <= MAX_REPETITION:
            return Calibration(feature, word, amp, True, texts)
    return Calibration(feature, word, FALLBACK_STRENGTH, False, texts)


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
    "CALIBRATION_GRID", "Calibration", "Defaults", "Preset", "calibrate", "clear_cache", "defaults", "fallback_presets",
    "feature_strength", "find_run", "from_results", "mentions_word", "preset_strength", "run_metas", "top_word",
]
