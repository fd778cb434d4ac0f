"""Scoring part of a wide SAE: feature subsets, the SAE restricted to them, and the cost a user confirms first.

Gemma Scope 2 comes in widths up to 1m features. Scoring every feature costs a logit lens and an output score
per feature plus encoding every corpus token into every feature, which is hours of CPU work and, for the
activation pass's top-context buffers, more memory than a laptop has. So the app measures what one feature
costs on the machine it runs on (:func:`measure_rates`), states the estimate, and starts a large run only
when the user confirmed at least that much (:func:`check_plan`); or it scores a subset (a random sample, or
ids the user gives).

A subset is scored by :func:`compute_subset` on the SAE *restricted* to those features (:func:`restrict`):
for SAEs whose latents are computed each on its own (JumpReLU, ReLU, gated), encoding with the sliced
encoder gives those latents exactly, and decoder rows are unchanged, so the logit lens, activation statistics
and input scores of the slice are those of the full SAE, at the slice's cost. The one quantity that looks at
every latent, the output score's ``max_j a_j(x_last)``, is taken from the full SAE (``latent_max``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .activations import AFTER, HIST_EDGES, TOP_N, WINDOW, from_residuals
from .config import ConfigError, ScoreParams
from .features import FeatureData, StageProgress, compute_many
from .models import LoadedModel
from .saes import LoadedSae, SaeLoadError
from .scores import LogitLens, logit_lens, output_scores
from .steering import capture_residuals, run_until_stop

#: Architectures whose latents do not depend on each other (no top-k competition): slices are exact.
PER_LATENT_ARCHITECTURES = ("jumprelu", "standard", "gated")
#: From this width on the app asks for a confirmation of the measured cost before scoring every feature.
CONFIRM_WIDTH = 262_144
#: ... and for any run estimated above this many seconds.
CONFIRM_SECONDS = 1800.0
#: Tokens per batch of the activation pass (32 sequences of 128, what the app's job uses).
PASS_BATCH_TOKENS = 32 * 128


class ScoringPlanError(ValueError):
    """A scoring run that was not confirmed, does not fit in memory, or names features the SAE lacks."""


# ---------------------------------------------------------------------------------------------------
# Subsets


def sample_features(width: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct feature ids drawn uniformly from 0..width-1 (sorted; the same for the same seed)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= width:
        raise ScoringPlanError(f"a sample needs between 1 and {width:,} features, got {n!r}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(width, size=int(n), replace=False)).astype(np.int64)


def check_ids(features: Iterable[int], width: int, sae_id: str) -> np.ndarray:
    """Distinct feature ids (sorted) after checking each is in 0..width-1, naming the first that is not."""
    ids = sorted({int(f) for f in features})
    if not ids:
        raise ScoringPlanError("no features given: give at least one feature id")
    bad = [f for f in ids if not 0 <= f < width]
    if bad:
        raise ScoringPlanError(f"feature {bad[0]} is out of range for SAE '{sae_id}': use ids from 0 to {width - 1}")
    return np.asarray(ids, dtype=np.int64)


def can_restrict(sae: LoadedSae) -> bool:
    arch = getattr(sae.sae.cfg, "architecture", None)
    return callable(arch) and arch() in PER_LATENT_ARCHITECTURES


@dataclass
class SubsetSae(LoadedSae):
    """An SAE restricted to some of another SAE's features (latent i here is ``features[i]`` there)."""

    parent: LoadedSae | None = None
    features: np.ndarray | None = None  # (n,) int64, ids in the parent, ascending

    def latent_max(self, x: torch.Tensor) -> torch.Tensor:
        # the paper's strength unit is the largest of *all* latents, not of the subset's
        return self.parent.latent_max(x)


@torch.no_grad()
def restrict(sae: LoadedSae, features: Sequence[int] | np.ndarray) -> SubsetSae:
    """``sae`` restricted to ``features``: a sae-lens SAE of the same class with the sliced encoder columns,
    decoder rows and per-latent vectors (bias, threshold...). Refused for SAEs whose latents compete (TopK)."""
    if not can_restrict(sae):
        arch = sae.sae.cfg.architecture() if callable(getattr(sae.sae.cfg, "architecture", None)) else "unknown"
        raise SaeLoadError(
            f"SAE '{sae.id}' ({arch}) cannot be scored on a subset of its features: its latents compete (as in TopK), "
            f"so a feature's activation depends on all the others; subsets work for {', '.join(PER_LATENT_ARCHITECTURES)} SAEs"
        )
    ids = check_ids(features, sae.width, sae.id)
    s = sae.sae
    d_sae = sae.width
    idx = torch.as_tensor(ids, device=s.W_dec.device)
    state = {}
    for name, t in s.state_dict().items():
        if name == "W_enc":
            t = t[:, idx]
        elif name == "W_dec":
            t = t[idx]
        elif name != "b_dec" and t.ndim == 1 and t.shape[0] == d_sae:
            t = t[idx]
        elif d_sae in t.shape:
            raise SaeLoadError(f"SAE '{sae.id}' has a parameter {name} of shape {tuple(t.shape)} that saesteer cannot restrict to a subset")
        state[name] = t.clone()
    meta = type(s.cfg.metadata)(**{**s.cfg.metadata.to_dict(), "subset_of": sae.id, "subset_of_width": d_sae})
    cfg = dataclasses.replace(s.cfg, d_sae=len(ids), metadata=meta)
    sliced = type(s)(cfg)
    sliced.load_state_dict(state)
    sliced.to(device=s.W_dec.device, dtype=s.W_dec.dtype)
    tag = hashlib.sha256(ids.tobytes()).hexdigest()[:8]
    return SubsetSae(sae=sliced, id=f"{sae.id}[{len(ids)} features {tag}]", hook_name=sae.hook_name, layer=sae.layer,
                     path=sae.path, parent=sae, features=ids)


def relabel(data: FeatureData, sub: SubsetSae) -> FeatureData:
    """Feature data of ``sub`` with rows named by the parent's feature ids, and meta naming the parent."""
    ids = sub.features
    table = data.table.copy()
    table["feature"] = ids[data.table["feature"].to_numpy()]
    lens = LogitLens(ids[data.lens.features], data.lens.top_ids, data.lens.top_logits, data.lens.bottom_ids, data.lens.bottom_logits)
    meta = {**data.meta, "sae_id": sub.parent.id, "width": sub.parent.width, "subset_sae_id": sub.id,
            "subset": {"n_features": len(ids), "of_width": sub.parent.width, "features": ids.tolist()}}
    return dataclasses.replace(data, meta=meta, table=table, lens=lens)


def compute_subset(
    lm: LoadedModel,
    sae: LoadedSae,
    features: Sequence[int] | np.ndarray,
    corpus_sequences: Iterable[Sequence[int]] | None,
    params: ScoreParams | None = None,
    n_tokens: int | None = 200_000,
    progress: StageProgress | None = None,
    **kwargs,
) -> FeatureData:
    """Feature data of ``features`` of ``sae`` (rows in ascending id order), computed on the restricted SAE by
    :func:`saesteer.features.compute_many` (same keyword arguments, e.g. ``cache``, ``store``, ``only``)."""
    sub = restrict(sae, features)
    data = compute_many(lm, [sub], corpus_sequences, params, n_tokens, progress=progress, use_bundled=False, **kwargs)[0]
    return relabel(data, sub)


def subset_label(meta: dict) -> str | None:
    """'500 of 262,144 features' for feature data of a subset, None for data of every feature."""
    sub = meta.get("subset")
    return f"{sub['n_features']:,} of {sub['of_width']:,} features" if sub else None


# ---------------------------------------------------------------------------------------------------
# Cost


@dataclass(frozen=True)
class CostRates:
    """What scoring costs on this machine, measured by :func:`measure_rates` for one model and SAE."""

    device: str
    """Where it was measured ('cpu', 'cuda:0')."""
    forward_s_per_token: float
    """Model forward up to the SAE's layer, per corpus token (paid once, whatever the number of features)."""
    encode_s_per_feature_token: float
    """Encoding one token into one feature and folding it into the statistics."""
    lens_s_per_feature: float
    """Logit lens (the unembedding of the feature's direction and its top/bottom tokens)."""
    output_s_per_feature: float
    """Output score (one batched last-token forward row)."""
    probe: str
    """What was timed, in words."""

    def estimate(self, n_features: int, n_tokens: int) -> CostEstimate:
        return CostEstimate(
            n_features=n_features, n_tokens=n_tokens, fixed_s=self.forward_s_per_token * n_tokens,
            lens_s=self.lens_s_per_feature, output_s=self.output_s_per_feature,
            encode_s=self.encode_s_per_feature_token * n_tokens, memory_bytes=memory_bytes(n_features), device=self.device,
        )


@dataclass(frozen=True)
class CostEstimate:
    """Estimated cost of scoring ``n_features`` features over ``n_tokens`` corpus tokens."""

    n_features: int
    n_tokens: int
    fixed_s: float
    """The corpus forward, once."""
    lens_s: float
    """Per feature: logit lens."""
    output_s: float
    """Per feature: output score."""
    encode_s: float
    """Per feature: encoding all ``n_tokens`` tokens."""
    memory_bytes: int
    """Peak memory of the activation pass, from its array sizes."""
    device: str

    @property
    def per_feature_s(self) -> float:
        return self.lens_s + self.output_s + self.encode_s

    @property
    def total_s(self) -> float:
        return self.fixed_s + self.n_features * self.per_feature_s

    def summary(self) -> str:
        return (
            f"≈ {format_duration(self.total_s)} on {self.device} for {self.n_features:,} features over {self.n_tokens:,} corpus tokens: "
            f"{self.per_feature_s * 1e3:.1f} ms per feature (logit lens {self.lens_s * 1e3:.1f}, output score {self.output_s * 1e3:.1f}, "
            f"encoding the corpus {self.encode_s * 1e3:.1f}) plus {format_duration(self.fixed_s)} for the corpus forward; "
            f"peak memory ≈ {self.memory_bytes / 1e9:.1f} GB"
        )


def memory_bytes(n_features: int, top_n: int = TOP_N, window: int = WINDOW, batch_tokens: int = PASS_BATCH_TOKENS) -> int:
    """Peak memory of an activation pass over ``n_features`` features: the running top-context buffers (ids,
    positions and windows of ``top_n`` contexts per feature, kept twice while they are sorted at the end) and
    one batch's dense activations (the pre-activations, the activations and their mask)."""
    slots = top_n * (4 + 4 * 8) + top_n * window * (8 + 4)  # acts f32, seq/pos/tok/start i64; window ids i64 + acts f32
    hist = (len(HIST_EDGES) - 1) * 8 + 8 + 4
    dense = batch_tokens * (4 + 4 + 1)
    return int(n_features * (2 * slots + hist + dense))


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def available_memory(device: str) -> int | None:
    """Bytes the activation pass may use on ``device``: free CUDA memory, or the system's available RAM."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def needs_confirmation(estimate: CostEstimate, width: int) -> bool:
    """Large widths scored whole, and any long run, start only after the user confirmed the estimate."""
    return (estimate.n_features >= CONFIRM_WIDTH and estimate.n_features == width) or estimate.total_s >= CONFIRM_SECONDS


def check_plan(estimate: CostEstimate, width: int, confirmed_s: float | None, available: int | None = None) -> None:
    """Refuse a run whose estimated cost is above what the user confirmed (or that needs a confirmation and has
    none), or whose activation pass would not fit in ``available`` bytes; each message says what to do."""
    if available is not None and estimate.memory_bytes > available:
        raise ScoringPlanError(
            f"scoring {estimate.n_features:,} features needs ≈ {estimate.memory_bytes / 1e9:.1f} GB for the activation pass, "
            f"but only {available / 1e9:.1f} GB are available: score a subset (a random sample or the ids you need)"
        )
    if not needs_confirmation(estimate, width):
        return
    if confirmed_s is None:
        raise ScoringPlanError(f"scoring {estimate.n_features:,} features takes {estimate.summary()}: confirm this cost first, or score a subset")
    if estimate.total_s > confirmed_s * 1.05:  # 5 %: the same plan re-measured on a noisy machine
        raise ScoringPlanError(
            f"this run is estimated at {format_duration(estimate.total_s)}, more than the {format_duration(confirmed_s)} you confirmed: "
            "confirm the larger cost, or score fewer features"
        )


def _corpus_batch(corpus_sequences: Iterable[Sequence[int]], n_sequences: int) -> torch.Tensor:
    seqs = []
    for seq in corpus_sequences:
        seqs.append([int(t) for t in seq])
        if len(seqs) == n_sequences:
            break
    if not seqs:
        raise ConfigError("the corpus yielded no sequences to measure the cost on")
    length = min(len(s) for s in seqs)
    if length < 2:
        raise ConfigError("the corpus sequences are too short to measure the cost on")
    return torch.tensor([s[:length] for s in seqs])


@torch.no_grad()
def measure_rates(
    lm: LoadedModel,
    sae: LoadedSae,
    corpus_sequences: Iterable[Sequence[int]],
    probe_features: int = 256,
    probe_encode_features: int = 2048,
    probe_sequences: int = 8,
    params: ScoreParams | None = None,
) -> CostRates:
    """Time each part of scoring on a few features and sequences (a few seconds on a CPU): the logit lens and
    output scores of ``probe_features`` features, one forward of ``probe_sequences`` corpus sequences to the
    SAE's layer, and the encoding of those tokens into ``probe_encode_features`` features."""
    params = params or ScoreParams()
    n = min(probe_features, sae.width)
    feats = np.arange(n, dtype=np.int64)
    ids = _corpus_batch(corpus_sequences, probe_sequences).to(lm.device)
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model.model
    # warm-up: the first calls pay for allocations and thread start-up that a long run does not
    warm = feats[: min(8, n)]
    output_scores(lm, sae, ScoreParams(params.prompt, params.amp, params.top_k, len(warm)), features=warm)
    with lm.lock, capture_residuals(lm, [sae.layer], stop=True):
        run_until_stop(lambda: decoder(input_ids=ids[:1], use_cache=False))
    t0 = time.perf_counter()
    lens = logit_lens(lm, sae, k=params.top_k, features=feats)
    t1 = time.perf_counter()
    output_scores(lm, sae, ScoreParams(params.prompt, params.amp, params.top_k, min(params.batch_size, n)), features=feats, lens=lens)
    t2 = time.perf_counter()

    t3 = time.perf_counter()
    with lm.lock, capture_residuals(lm, [sae.layer], stop=True) as resid:
        run_until_stop(lambda: decoder(input_ids=ids, use_cache=False))
    t4 = time.perf_counter()
    n_enc = min(probe_encode_features, sae.width)
    enc_sae = restrict(sae, np.arange(n_enc)) if can_restrict(sae) and n_enc < sae.width else sae
    n_enc = enc_sae.width
    bos = lm.tokenizer.bos_token_id
    tokens = int((ids != bos).sum()) if bos is not None else ids.numel()
    t5 = time.perf_counter()
    from_residuals([enc_sae], [(ids.cpu().numpy(), {sae.layer: resid[sae.layer]})], bos, top_n=TOP_N, window=WINDOW, after=AFTER)
    t6 = time.perf_counter()
    return CostRates(
        device=str(lm.device), forward_s_per_token=(t4 - t3) / max(tokens, 1), encode_s_per_feature_token=(t6 - t5) / (n_enc * max(tokens, 1)),
        lens_s_per_feature=(t1 - t0) / n, output_s_per_feature=(t2 - t1) / n,
        probe=f"logit lens and output scores of {n} features, {tokens:,} corpus tokens encoded into {n_enc:,} features",
    )
