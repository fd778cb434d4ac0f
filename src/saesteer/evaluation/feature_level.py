"""The paper's feature-level experiment: steer random features and count how often their own tokens come out.

Protocol (Arad, Mueller & Belinkov 2025, ``src/steer.py`` and ``src/plot.py`` of its code):

1. Sample ``n_features`` features of the SAE at random (seeded; or give them).
2. Steer each in paper mode, ``a_f += amp · max_j a_j`` at the last position of every forward, for every amp
   of the grid (0.2 … 20), on each neutral prefix (the paper's 50, or the first ``n_prefixes``): sampled at
   temperature 0.7, at most 20 new tokens, ending after the first token that contains "." (transformers'
   ``stop_strings="."``). Each generation is sampled from its own generator, seeded by (seed, feature, amp,
   prefix), so it is what it would be alone (tested), and the batch composition never changes a text.
3. **Generation success@k** of a text: re-tokenise the continuation without BOS and count its token ids that
   are among the feature's top-k logit-lens ids (duplicates count; case and the leading space matter, since
   matching is by id); averaged over the prefixes. k = 1, 5, 20.
4. Per generation also this project's fluency (:mod:`.metrics`: repetition and perplexity under the
   unsteered model, against the median perplexity of unsteered continuations of the same prefixes).
5. **Best amp** of a feature: the amp with the highest mean of ``[success@20 > 0] · fluency`` over its texts
   (the paper chose its factor by an LLM-judged harmonic mean of concept and fluency; this is the offline
   stand-in: a text counts when it shows the feature's tokens, weighted by how fluent it is); ties go to the
   smaller amp. Success@k is reported at the best amp (``select="success"`` picks the amp of highest mean
   success@20 instead). Perplexity is only computed where it can matter: for texts with success > 0, and
   for every text at the chosen amp.

Rows of many features are decoded together (``batch_size`` rows a call, finished rows leaving the batch);
results are written per unit of ``features_per_unit`` features, so an interrupted run resumes (with the
features no finished unit holds, whatever the unit size was). Read a run
with :func:`load_feature_run`; :func:`feature_summary` gives the paper's statistics.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from .. import paths
from ..config import MAX_ABS_STRENGTH, PAPER_STRENGTHS, ConfigError, check_whole
from ..models import LoadedModel
from ..saes import LoadedSae
from . import layout
from .candidates import FeatureBank
from .metrics import Z95, continuation_nll, fluency, ppl_factor, repetition

#: The paper's output-score thresholds (``plot.py``): 1e-10 … 1e-3, then 0.01 … 0.9.
OUTPUT_THRESHOLDS = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9)
#: Input-score thresholds shown beside them (input scores are shares in [0, 1]).
INPUT_THRESHOLDS = (1e-10, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
KS = (1, 5, 20)
#: The headline states a verdict only with at least this many features on each side of the threshold.
MIN_SIDE = 5
Progress = Callable[[int, int], None]
Log = Callable[[str], None]


def paper_prefixes() -> list[str]:
    """The paper's 50 neutral prefixes (``assets/eval/paper_prefixes.txt``)."""
    return layout.read_list(layout.PAPER_PREFIXES)


@dataclass(frozen=True)
class FeatureLevelParams:
    """One feature-level run; everything that changes results is here (and checked on resume)."""

    n_features: int = 100
    """Features sampled at random (ignored when ``features`` is given)."""
    seed: int = 0
    """Seeds the feature sample and every generation's sampler."""
    features: tuple[int, ...] | None = None
    """Explicit features instead of a random sample."""
    amps: tuple[float, ...] = PAPER_STRENGTHS
    """Paper-mode amplifications swept."""
    n_prefixes: int = 50
    """Prefixes used: the first n of the paper's 50."""
    temperature: float = 0.7
    """Sampling temperature (the paper's 0.7)."""
    max_new_tokens: int = 20
    """Most new tokens per generation (the paper's 20)."""
    stop: str = "."
    """A generation ends after the first token containing this text (the paper's ``stop_strings``)."""
    select: Literal["combined", "success"] = "combined"
    """How the best amp is chosen: mean [success@20 > 0]·fluency, or mean success@20."""
    ppl_max: float = 1000.0
    """Perplexity at which the fluency factor reaches 0."""
    rep_n: int = 2
    """n of the repeated-n-gram measure."""
    batch_size: int = 384
    """Most rows per decode call (results do not depend on it; out of memory it is halved)."""
    features_per_unit: int | None = None
    """Features per saved unit; by default as many as fill one decode call (``batch_size`` // (amps × prefixes),
    at least 1: small calls are several times slower per token on a CPU). Results do not depend on it; a resume
    skips the finished features, whatever the size of the units they were saved in."""

    def __post_init__(self) -> None:
        if not self.amps or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0 < a <= MAX_ABS_STRENGTH for a in self.amps):
            raise ConfigError(f"amps must be numbers in (0, {MAX_ABS_STRENGTH:g}], got {self.amps!r}")
        if len(set(self.amps)) != len(self.amps):
            raise ConfigError(f"amps must not repeat, got {self.amps!r}")
        for name in ("n_features", "n_prefixes", "max_new_tokens", "batch_size", "rep_n"):
            check_whole(name, getattr(self, name))
        if self.features_per_unit is not None:
            check_whole("features_per_unit", self.features_per_unit)
        if self.n_prefixes > 50:
            raise ConfigError(f"n_prefixes must be at most 50 (the paper's prefixes), got {self.n_prefixes}")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"temperature must be > 0 (the protocol samples), got {self.temperature!r}")
        if self.select not in ("combined", "success"):
            raise ConfigError(f"select must be 'combined' or 'success', got {self.select!r}")
        if self.features is not None and (not self.features or len(set(self.features)) != len(self.features)):
            raise ConfigError("features must be a non-empty list of distinct feature ids")
        if not self.ppl_max > 1:
            raise ConfigError(f"ppl_max must be > 1, got {self.ppl_max!r}")

    @property
    def unit_size(self) -> int:
        """Features per saved unit: ``features_per_unit``, else as many as fill one decode call."""
        if self.features_per_unit is not None:
            return self.features_per_unit
        return max(1, self.batch_size // (len(self.amps) * self.n_prefixes))

    def key(self) -> dict:
        """The settings that must match to resume a run."""
        d = asdict(self)
        for k in ("batch_size", "features_per_unit"):
            d.pop(k)
        d["amps"] = list(self.amps)
        d["features"] = None if self.features is None else list(self.features)
        return d


def sample_features(n_total: int, params: FeatureLevelParams) -> list[int]:
    """The features of a run: ``params.features`` (checked against the SAE's width), else a seeded random
    sample of ``n_features`` distinct ids, in ascending order."""
    if params.features is not None:
        bad = [f for f in params.features if not 0 <= int(f) < n_total]
        if bad:
            raise ConfigError(f"feature(s) {bad} are out of range: this SAE has features 0..{n_total - 1}")
        return sorted(int(f) for f in params.features)
    if params.n_features > n_total:
        raise ConfigError(f"n_features={params.n_features} but the SAE has only {n_total} features")
    rng = np.random.default_rng([params.seed, 0xFEA7])
    return sorted(int(f) for f in rng.choice(n_total, params.n_features, replace=False))


def row_seed(seed: int, feature: int, amp: float, prefix_idx: int) -> int:
    """The sampler seed of one generation (feature -1: unsteered)."""
    return zlib.crc32(f"{seed}:{feature}:{amp!r}:{prefix_idx}".encode())


def success_counts(token_ids: Sequence[int], top_ids: Sequence[int], ks: Sequence[int] = KS) -> dict[int, int]:
    """Per k: how many of ``token_ids`` (duplicates count) are among the first k of ``top_ids``."""
    out = {}
    for k in ks:
        top = set(int(t) for t in top_ids[:k])
        out[k] = sum(1 for t in token_ids if int(t) in top)
    return out


def continuation_text(tokenizer, prefix: str, new_ids: Sequence[int]) -> str:
    """The text of ``new_ids`` generated after ``prefix``: decode(prefix ids + new ids) minus decode(prefix ids)."""
    pre = list(tokenizer(prefix).input_ids)
    head = tokenizer.decode(pre, skip_special_tokens=True)
    full = tokenizer.decode(pre + list(new_ids), skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(new_ids), skip_special_tokens=True)


def retokenize(tokenizer, text: str) -> list[int]:
    """The paper's re-tokenisation of a continuation: its ids without BOS (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


@dataclass
class _Row:
    feature: int
    amp: float
    prefix_idx: int


class FeatureLevelRun:
    """One feature-level run of one SAE layer, writing under ``out`` (see :func:`run_feature_level`)."""

    def __init__(self, lm: LoadedModel, sae: LoadedSae, bank: FeatureBank, out: str | Path,
                 params: FeatureLevelParams = FeatureLevelParams(), prefixes: Sequence[str] | None = None,
                 resume: bool = False, log: Log | None = None):
        prefixes = list(prefixes) if prefixes is not None else paper_prefixes()
        if len(prefixes) < params.n_prefixes:
            raise ConfigError(f"{len(prefixes)} prefixes given but n_prefixes={params.n_prefixes}")
        if bank.top_ids.shape[1] < max(KS):
            raise ConfigError(f"the feature data has {bank.top_ids.shape[1]} logit-lens tokens per feature; success@20 needs 20")
        self.lm, self.sae, self.bank, self.params = lm, sae, bank, params
        self.prefixes = prefixes[: params.n_prefixes]
        self.out = Path(out)
        self.log = log or (lambda _m: None)
        self.features = sample_features(sae.width, params)
        missing = [f for f in self.features if not bank.has(f)]
        if missing:
            raise ConfigError(f"the feature data lacks feature(s) {missing[:5]}: compute scores for the whole SAE first")
        self.stop_ids = _stop_ids(lm, params.stop)
        self._batch = params.batch_size
        self.meta = layout.open_run(self.out, self._meta(), resume, same=("model", "model_fingerprint", "sae_id", "sae_fingerprint", "layer", "prefixes", "params"))

    def _meta(self) -> dict:
        from ..store import model_fingerprint, sae_fingerprint

        return {
            "experiment": "features", "model": self.lm.name, "model_fingerprint": model_fingerprint(self.lm),
            "sae_id": self.sae.id, "sae_fingerprint": sae_fingerprint(self.sae), "layer": self.sae.layer,
            "hook_name": self.sae.hook_name, "params": self.params.key(), "prefixes": self.prefixes,
            "features": self.features, "feature_data": self.bank.source,
        }

    # -- decoding -------------------------------------------------------------------------------

    def generate(self, rows: Sequence[_Row], feats: Sequence[int]) -> list[list[int]]:
        """Token ids of each row's continuation (row: feature -1 is unsteered), ``batch_size`` rows a call."""
        from ..memory import for_each_batch
        from ..steering import sample_until_stop

        p = self.params
        feats = list(feats)
        col = {f: i for i, f in enumerate(feats)}
        strengths = torch.zeros(len(rows), len(feats))
        for i, r in enumerate(rows):
            if r.feature >= 0:
                strengths[i, col[r.feature]] = r.amp
        out: list[list[int]] = [[] for _ in rows]

        def step(s: int, e: int) -> None:
            out[s:e] = sample_until_stop(
                self.lm, [self.prefixes[r.prefix_idx] for r in rows[s:e]], sae=self.sae if feats else None, features=feats,
                strengths=strengths[s:e], seeds=[row_seed(p.seed, r.feature, r.amp, r.prefix_idx) for r in rows[s:e]],
                temperature=p.temperature, max_new_tokens=p.max_new_tokens, stop_ids=self.stop_ids)

        n = len(rows)
        even = -(-n // -(-n // self._batch)) if n else self._batch  # calls of equal size
        used = for_each_batch(n, even, step, "prompts")
        self._batch = min(self._batch, used)
        return out

    def _texts(self, rows: Sequence[_Row], ids: Sequence[Sequence[int]]) -> list[str]:
        """Each continuation as the paper has it: the decoded prefix + continuation with the prefix's text cut
        off, so that the leading space survives (a tokenizer may drop it when a continuation is decoded alone,
        and the re-tokenised first token would then be another id)."""
        return [continuation_text(self.lm.tokenizer, self.prefixes[r.prefix_idx], list(t)) for r, t in zip(rows, ids)]

    # -- the unsteered reference ------------------------------------------------------------------

    def unsteered(self) -> pd.DataFrame:
        """One sampled unsteered continuation per prefix, with its perplexity (generated once per run)."""
        path = self.out / "units" / "_unsteered.parquet"
        if path.exists():
            frame = pd.read_parquet(path)
        else:
            rows = [_Row(-1, 0.0, i) for i in range(len(self.prefixes))]
            texts = self._texts(rows, self.generate(rows, []))
            nll, count = continuation_nll(self.lm, self.prefixes, texts)
            frame = pd.DataFrame({"prefix_idx": range(len(rows)), "text": texts, "n_tokens": count,
                                  "ppl": [math.exp(v) if c else math.nan for v, c in zip(nll, count)]})
            frame["token_ids"] = [retokenize(self.lm.tokenizer, t) for t in texts]
            layout.write_parquet(path, frame)
        if "ppl_ref" not in self.meta:  # also when a run stopped between the parquet and meta.json
            ppl = frame["ppl"].dropna()
            self.meta["ppl_ref"] = float(ppl.median()) if len(ppl) else math.nan
            layout.write_meta(self.out, self.meta)
        return frame

    # -- one unit ---------------------------------------------------------------------------------

    def run_unit(self, feats: Sequence[int]) -> pd.DataFrame:
        """Generate, score and choose the best amp of ``feats``; returns their generations."""
        p = self.params
        ref = self.meta.get("ppl_ref", math.nan)
        rows = [_Row(f, a, i) for f in feats for a in p.amps for i in range(len(self.prefixes))]
        t0 = time.perf_counter()
        ids = self.generate(rows, feats)
        gen_s = time.perf_counter() - t0
        texts = self._texts(rows, ids)
        recs = []
        for r, t, gen in zip(rows, texts, ids):
            tok = retokenize(self.lm.tokenizer, t)
            top = self.bank.top_ids[self.bank.row(r.feature)]
            s = success_counts(tok, top)
            recs.append({"feature": r.feature, "amp": float(r.amp), "prefix_idx": r.prefix_idx, "text": t,
                         "n_new_tokens": len(gen), "stopped": bool(gen) and gen[-1] in self._stop_set,
                         **{f"success_{k}": s[k] for k in KS}, "repetition": repetition(t, p.rep_n)})
        frame = pd.DataFrame(recs)
        frame["ppl"] = math.nan
        # Perplexity where it can matter: texts that succeed (the selection score is 0 for the others) ...
        self._fill_ppl(frame, frame["success_20"] > 0)
        frame["fluency"] = [fluency(rep, ppl_factor(ppl, ref, p.ppl_max)) if math.isfinite(ppl) else math.nan
                            for rep, ppl in zip(frame["repetition"], frame["ppl"])]
        best = best_amps(frame, p.select)
        # ... and every text at the chosen amp, so that the reported fluency covers all of them.
        at_best = frame["amp"] == frame["feature"].map(best)
        self._fill_ppl(frame, at_best & frame["ppl"].isna())
        frame["fluency"] = [fluency(rep, ppl_factor(ppl, ref, p.ppl_max)) if math.isfinite(ppl) else math.nan
                            for rep, ppl in zip(frame["repetition"], frame["ppl"])]
        frame["best"] = at_best
        self._timing = {"features": list(map(int, feats)), "rows": len(rows), "decoded_tokens": int(sum(len(g) for g in ids)),
                        "gen_seconds": gen_s, "seconds": time.perf_counter() - t0}
        return frame

    def _fill_ppl(self, frame: pd.DataFrame, where: pd.Series) -> None:
        idx = list(np.flatnonzero(where.to_numpy()))
        if not idx:
            return
        nll, count = continuation_nll(self.lm, [self.prefixes[int(frame["prefix_idx"].iat[i])] for i in idx],
                                      [frame["text"].iat[i] for i in idx])
        col = frame.columns.get_loc("ppl")
        for i, v, c in zip(idx, nll, count):
            frame.iat[i, col] = math.exp(v) if c else math.nan

    @property
    def _stop_set(self) -> set[int]:
        return set(self.stop_ids)

    def unit_name(self, feats: Sequence[int]) -> str:
        return f"f{feats[0]:06d}-{feats[-1]:06d}"

    def run(self, progress: Progress | None = None) -> None:
        self.meta.pop("finished", None)
        layout.write_meta(self.out, self.meta)
        self.unsteered()
        # Resume per feature, not per unit: the units of an earlier run may have had another size.
        finished = finished_features(self.out)
        todo = [f for f in self.features if f not in finished]
        step = self.params.unit_size
        units = [todo[i: i + step] for i in range(0, len(todo), step)]
        done = len(self.features) - len(todo)
        if progress:
            progress(done, len(self.features))
        for u in units:
            name = self.unit_name(u)
            frame = self.run_unit(u)
            layout.save_unit(self.out, name, {"features": list(map(int, u))}, frame)
            layout.append_timing(self.out, self._timing)
            done += len(u)
            t = self._timing
            self.log(f"features {u[0]}..{u[-1]}: {t['rows']} generations, {t['decoded_tokens']} tokens in {t['gen_seconds']:.0f}s "
                     f"({t['decoded_tokens'] / max(t['gen_seconds'], 1e-9):.0f} tokens/s), {t['seconds']:.0f}s in all; {done}/{len(self.features)}")
            if progress:
                progress(done, len(self.features))
        self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        layout.write_meta(self.out, self.meta)


def finished_features(out: str | Path) -> set[int]:
    """The features of the finished units of the run in ``out``."""
    return {int(f) for rec in layout.unit_records(out) for f in rec.get("features", ())}


def _stop_ids(lm: LoadedModel, stop: str) -> list[int]:
    from ..steering import stop_token_ids

    return stop_token_ids(lm, stop) if stop else []


def best_amps(frame: pd.DataFrame, select: str = "combined") -> dict[int, float]:
    """Per feature, the amp with the highest selection score (mean over its texts; ties: the smaller amp)."""
    f = frame.copy()
    if select == "success":
        f["_score"] = f["success_20"].astype(float)
    else:
        f["_score"] = np.where(f["success_20"] > 0, f["fluency"].fillna(0.0), 0.0)
    means = f.groupby(["feature", "amp"])["_score"].mean()
    out = {}
    for feat, part in means.groupby(level=0):
        part = part.droplevel(0)
        top = part.max()
        out[int(feat)] = float(min(a for a, v in part.items() if v >= top - 1e-12))
    return out


def run_feature_level(lm: LoadedModel, sae: LoadedSae, bank: FeatureBank, out: str | Path,
                      params: FeatureLevelParams = FeatureLevelParams(), prefixes: Sequence[str] | None = None,
                      resume: bool = False, log: Log | None = None, progress: Progress | None = None) -> FeatureRun:
    """Run (or resume) the feature-level experiment under ``out`` and return its results."""
    FeatureLevelRun(lm, sae, bank, out, params, prefixes, resume, log).run(progress)
    return load_feature_run(out, bank)


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass
class FeatureRun:
    """A feature-level run read back from disk (finished or partial)."""

    meta: dict
    generations: pd.DataFrame
    """One row per generation: feature, amp, prefix_idx, text, success_1/5/20, repetition, ppl, fluency, best."""
    features: pd.DataFrame
    """One row per finished feature (:func:`feature_table`)."""
    unsteered: pd.DataFrame = field(default_factory=pd.DataFrame)
    timings: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def finished(self) -> bool:
        return self.meta.get("finished") is not None

    @property
    def n_planned(self) -> int:
        return len(self.meta.get("features") or [])

    def summary(self) -> dict:
        return feature_summary(self.features)


def feature_table(gens: pd.DataFrame, scores: pd.DataFrame | None, unsteered: pd.DataFrame | None = None,
                  top_ids: dict[int, Sequence[int]] | None = None) -> pd.DataFrame:
    """Per feature: best amp, success@1/5/20 and fluency at it, the highest success@20 over amps, and (when
    given) output score, input score, density, and success@20 of the unsteered texts."""
    if gens.empty:
        return pd.DataFrame(columns=["feature", "best_amp", *[f"success_{k}" for k in KS], "fluency"])
    best = gens[gens["best"]]
    g = best.groupby("feature")
    out = g[[f"success_{k}" for k in KS]].mean()
    out["fluency"] = g["fluency"].mean()
    out["best_amp"] = g["amp"].first()
    out["max_success_20"] = gens.groupby(["feature", "amp"])["success_20"].mean().groupby(level=0).max()
    out = out.reset_index()
    if unsteered is not None and len(unsteered) and top_ids is not None:
        base = {f: float(np.mean([success_counts(t, top_ids[f], (20,))[20] for t in unsteered["token_ids"]])) for f in out["feature"]}
        out["unsteered_success_20"] = out["feature"].map(base)
    if scores is not None:
        cols = [c for c in ("output_score", "input_score", "density") if c in scores.columns]
        out = out.merge(scores[["feature", *cols]], on="feature", how="left")
    return out


def load_feature_run(out: str | Path, bank: FeatureBank | None = None) -> FeatureRun:
    """Read a feature-level run directory (also while it runs). Scores come from ``meta.json``'s copy of each
    feature's scores (written with the run) or from ``bank``."""
    out = Path(out)
    meta = layout.read_meta(out)
    if meta.get("experiment") != "features":
        raise ConfigError(f"{out} holds no feature-level run (its meta.json is of experiment {meta.get('experiment')!r})")
    units, frames = layout.read_units(out)
    gens = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(gens):  # a feature run twice (units of runs before resumption went per feature) counts once: its first unit
        gens = gens.drop_duplicates(["feature", "amp", "prefix_idx"], keep="first", ignore_index=True)
    unsteered = layout.read_parquet_if(out / "units" / "_unsteered.parquet", out / "unsteered.parquet")
    scores = None
    top = None
    if bank is not None:
        feats = sorted(set(meta.get("features") or []))
        rows = [bank.row(f) for f in feats]
        scores = pd.DataFrame({"feature": feats, "output_score": bank.output_score[rows], "input_score": bank.input_score[rows],
                               "density": bank.density[rows]})
        top = {f: list(bank.top_ids[r]) for f, r in zip(feats, rows)}
    elif (out / "feature_scores.csv").exists():
        scores = pd.read_csv(out / "feature_scores.csv")
        top = {int(f): json.loads(t) for f, t in zip(scores["feature"], scores["top_ids"])} if "top_ids" in scores.columns else None
    table = feature_table(gens, scores, unsteered, top) if len(gens) else feature_table(gens, None)
    return FeatureRun(meta, gens, table, unsteered, layout.read_timings(out))


def write_feature_scores(out: str | Path, bank: FeatureBank, features: Sequence[int]) -> None:
    """Keep the run's features' scores and logit-lens ids next to it, so that a packed run reads alone."""
    rows = [bank.row(f) for f in features]
    pd.DataFrame({"feature": list(features), "output_score": bank.output_score[rows], "input_score": bank.input_score[rows],
                  "density": bank.density[rows], "top_ids": [json.dumps([int(t) for t in bank.top_ids[r][:20]]) for r in rows]}
                 ).to_csv(Path(out) / "feature_scores.csv", index=False)


# ---------------------------------------------------------------------------------------------------
# The paper's statistics


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """Spearman's rho, its two-sided p-value and n, over the pairs where both are finite."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan, math.nan, int(ok.sum())
    r = spearmanr(x[ok], y[ok])
    return float(r.statistic), float(r.pvalue), int(ok.sum())


def threshold_table(table: pd.DataFrame, score: str = "output_score", thresholds: Sequence[float] = OUTPUT_THRESHOLDS,
                    metric: str = "success_20") -> pd.DataFrame:
    """Per threshold t: features with ``score`` >= t and below, their mean ``metric`` (± standard error), and
    the ratio above ÷ below."""
    rows = []
    vals = table[score].astype(float)
    m = table[metric].astype(float)
    for t in thresholds:
        above, below = m[vals >= t], m[vals < t]

        def sem(s: pd.Series) -> float:
            return float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else math.nan

        rows.append({"threshold": t, "n_above": len(above), "mean_above": float(above.mean()) if len(above) else math.nan,
                     "sem_above": sem(above), "n_below": len(below), "mean_below": float(below.mean()) if len(below) else math.nan,
                     "sem_below": sem(below),
                     "ratio": float(above.mean() / below.mean()) if len(above) and len(below) and below.mean() > 0 else math.nan})
    return pd.DataFrame(rows)


def joint_table(table: pd.DataFrame) -> pd.DataFrame:
    """Counts of features by input-score bin (rows) and output-score bin (columns)."""
    ib = pd.cut(table["input_score"].astype(float), [-np.inf, 0, 0.1, 0.5, np.inf], labels=["0", "(0, 0.1]", "(0.1, 0.5]", "> 0.5"])
    ob = pd.cut(table["output_score"].astype(float), [-np.inf, 1e-3, 0.01, 0.1, np.inf], right=False,
                labels=["< 1e-3", "[1e-3, 0.01)", "[0.01, 0.1)", ">= 0.1"])
    t = pd.crosstab(ib.rename("input score"), ob.rename("output score"), dropna=False)
    t.index = pd.Index([str(i) for i in t.index], name="input score")  # plain labels: tables of categoricals do not serialise
    t.columns = pd.Index([str(c) for c in t.columns], name="output score")
    return t


def feature_summary(table: pd.DataFrame) -> dict:
    """The paper's statistics of a run's feature table: Spearman rho of output and of input score against
    success@k, the threshold tables, the best-amp distribution and the joint score distribution."""
    out: dict = {"n_features": int(len(table))}
    if table.empty or "output_score" not in table.columns:
        return out
    for score in ("output_score", "input_score"):
        for k in KS:
            r, pv, n = spearman(table[score], table[f"success_{k}"])
            out[f"rho_{score}_success_{k}"] = r
            out[f"p_{score}_success_{k}"] = pv
            out[f"n_{score}"] = n
    out["thresholds_output"] = threshold_table(table, "output_score", OUTPUT_THRESHOLDS)
    out["thresholds_input"] = threshold_table(table, "input_score", INPUT_THRESHOLDS)
    out["best_amp_counts"] = table["best_amp"].value_counts().sort_index()
    out["joint"] = joint_table(table)
    both = (table["input_score"] >= 0.5) & (table["output_score"] >= 0.1)
    out["n_high_both"] = int(both.sum())
    out["mean_success_20"] = float(table["success_20"].mean())
    return out


def headline(summary: dict, threshold: float = 0.01) -> str:
    """One sentence on whether the feature-level claim holds on this run, computed from the data."""
    if summary.get("n_features", 0) < 3 or "thresholds_output" not in summary:
        return "Too few features are finished to test the claim."
    t = summary["thresholds_output"].set_index("threshold").loc[threshold]
    rho = summary["rho_output_score_success_20"]
    rho_in = summary["rho_input_score_success_20"]
    if not (t["n_above"] and t["n_below"]):
        return f"All {summary['n_features']} features fall on one side of output score {threshold:g}: the threshold claim cannot be tested here."
    if min(t["n_above"], t["n_below"]) < MIN_SIDE:
        return (f"Too few features to test the claim: {int(t['n_above'])} at or above output score {threshold:g} and "
                f"{int(t['n_below'])} below (at least {MIN_SIDE} on each side are needed); mean success@20 {t['mean_above']:.2f} vs "
                f"{t['mean_below']:.2f}; Spearman rho of output score vs success@20 = {rho:.2f}, of input score = {rho_in:.2f}.")
    gap = t["mean_above"] - t["mean_below"]
    se = math.hypot(t["sem_above"], t["sem_below"]) if math.isfinite(t["sem_above"]) and math.isfinite(t["sem_below"]) else math.nan
    p_rho = summary.get("p_output_score_success_20", math.nan)
    if math.isfinite(se) and gap > Z95 * se and rho > 0 and p_rho < 0.05:
        verdict = "holds"
    elif math.isfinite(se) and gap < -Z95 * se:
        verdict = "does not hold (the difference goes the other way)"
    elif gap > 0:
        verdict = "is not established (the difference points the paper's way but is within noise)"
    else:
        verdict = "does not hold (no higher success above the threshold)"
    se_txt = f" ± {se:.2f}" if math.isfinite(se) else ""
    return (f"The feature-level claim {verdict} on this run: features with output score >= {threshold:g} reach mean success@20 "
            f"{t['mean_above']:.2f} (n={int(t['n_above'])}) against {t['mean_below']:.2f} (n={int(t['n_below'])}) below, a gap of "
            f"{gap:.2f}{se_txt} (SE); Spearman rho of output score vs success@20 = {rho:.2f} (p = {p_rho:.2g}), of input score = {rho_in:.2f}. "
            f"It holds when the gap exceeds {Z95:g} SE and rho > 0 with p < 0.05.")


# ---------------------------------------------------------------------------------------------------
# Reader API of the shipped results (used by other parts of the app, e.g. presets and default strengths)


def shipped_dir(sae_id: str, model_name: str | None = None) -> Path:
    """Where the feature-level results of a bundled SAE are shipped: ``assets/eval/results/<model>/<sae id>/features``."""
    from ..config import EMBEDDED_MODEL

    return paths.EVAL_RESULTS / (model_name or EMBEDDED_MODEL) / sae_id / layout.FEATURES_SUBDIR


def load_shipped(sae_id: str, model_name: str | None = None) -> FeatureRun | None:
    """The shipped feature-level run of ``sae_id`` (finished or partial), or None when none is shipped."""
    d = shipped_dir(sae_id, model_name)
    if not (d / "meta.json").exists():
        return None
    return load_feature_run(d)


def best_amp_of(run: FeatureRun) -> dict[int, float]:
    """Feature -> its best paper-mode amp in ``run`` (only the features the run steered)."""
    return {int(f): float(a) for f, a in zip(run.features["feature"], run.features["best_amp"])}
