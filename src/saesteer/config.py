"""Validated configuration dataclasses. Each check names what was wrong and what is allowed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

EMBEDDED_MODEL = "gemma-3-270m"
NEUTRAL_PROMPT = "From my experience,"
#: The paper's amplification grid for steering sweeps (Arad et al., 2025).
PAPER_STRENGTHS = (0.2, 0.4, 0.8, 1.2, 1.6, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 20.0)
#: The paper's sampling temperature for steered generation.
PAPER_TEMPERATURE = 0.7
#: New tokens per column the lab and the duel start with (the fluent defaults are calibrated at it too).
LIVE_NEW_TOKENS = 32
#: A concept (the duel, a link's ``concept``) is a word or a short phrase of at most this many characters.
MAX_CONCEPT_CHARS = 64
#: Strengths beyond this are refused: they only produce numerical garbage.
MAX_ABS_STRENGTH = 1000.0
MAX_NEW_TOKENS_LIMIT = 1024

Dtype = Literal["float32", "bfloat16", "float16"]
SteerMode = Literal["paper", "additive"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what is allowed."""


def check_whole(name: str, value, low: int = 1, high: int | None = None) -> None:
    """Refuse ``value`` unless it is a whole number (a bool is not) from ``low`` to ``high`` (no bound: None)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer from {low} to {high}" if high is not None else f"a whole number >= {low}"
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def check_numbers(name: str, values, bound: float = MAX_ABS_STRENGTH) -> None:
    """Refuse ``values`` unless it is a non-empty list of finite numbers with |value| <= ``bound``."""
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ConfigError(f"{name} must be a non-empty list of finite numbers, got {values!r}")
    if any(abs(v) > bound for v in values):
        raise ConfigError(f"{name} {values!r} are out of range: use |value| <= {bound:g}")


@dataclass(frozen=True)
class ModelSpec:
    """Which language model to load and how."""

    name: str = EMBEDDED_MODEL
    """'gemma-3-270m' (embedded, offline), a local HF directory, or a hub id such as 'google/gemma-2-2b'."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: Dtype = "float32"
    """Weight dtype. float32 is exact and fastest for batched CPU work; bf16/fp16 halve memory."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless the user turns it on explicitly."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ConfigError("model name is empty: use 'gemma-3-270m', a local directory or a hub id")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype {self.dtype!r} is not supported: use float32, bfloat16 or float16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device {self.device!r} is not supported: use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class SaeSpec:
    """Where an SAE comes from."""

    source: Literal["bundled", "release", "local"] = "bundled"
    """'bundled' (shipped under assets/), 'release' (a sae-lens release + id) or 'local' (a directory)."""
    layer: int | None = None
    """Layer of a bundled SAE."""
    release: str | None = None
    """sae-lens release name, e.g. 'gemma-scope-2b-pt-res-canonical'."""
    sae_id: str | None = None
    """sae-lens SAE id within the release, e.g. 'layer_20/width_16k/canonical'; for bundled SAEs, its id."""
    path: str | None = None
    """Directory in sae-lens format (cfg.json + sae_weights.safetensors)."""

    def __post_init__(self) -> None:
        if self.source not in ("bundled", "release", "local"):
            raise ConfigError(f"SAE source {self.source!r} is unknown: use bundled, release or local")
        if self.source == "release" and not (self.release and self.sae_id):
            raise ConfigError("a sae-lens release needs both a release name and an SAE id")
        if self.source == "local" and not self.path:
            raise ConfigError("a local SAE needs a directory path")
        if self.source == "bundled" and self.layer is None and self.sae_id is None:
            raise ConfigError("a bundled SAE needs a layer (or a bundled id)")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"layer must be a non-negative integer, got {self.layer!r}")


@dataclass(frozen=True)
class ScoreParams:
    """Parameters of the output score; defaults are the paper's."""

    prompt: str = NEUTRAL_PROMPT
    """Neutral prompt, prefixed with BOS; the feature is amplified at its last position."""
    amp: float = 10.0
    """Amplification: the added activation is amp · max_j a_j(x_last)."""
    top_k: int = 20
    """Number of logit-lens tokens T of a feature."""
    batch_size: int = 512
    """Features scored per forward of the last token: speed and memory, never the scores (measured:
    benchmarks/results/score_batch_size.md)."""

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ConfigError("the output-score prompt is empty")
        if not math.isfinite(self.amp) or self.amp <= 0:
            raise ConfigError(f"amp must be a positive finite number, got {self.amp!r}")
        if not 1 <= self.top_k <= 1000:
            raise ConfigError(f"top_k must be between 1 and 1000, got {self.top_k!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class SteerParams:
    """One steered (and baseline) generation."""

    features: tuple[int, ...] = ()
    """Feature ids to steer with."""
    strengths: tuple[float, ...] = ()
    """One strength per feature: amp (paper mode) or coefficient (additive mode)."""
    mode: SteerMode = "paper"
    """paper: add amp·max_j a_j(x)·W_dec[f] at the last position; additive: add coeff·W_dec[f] everywhere."""
    max_new_tokens: int = 32
    """Tokens to generate, 1..1024."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples."""
    seed: int = 0
    """Seed for sampling."""
    max_prompt_tokens: int = 2048
    """Prompts longer than this (in tokens) are refused."""

    def __post_init__(self) -> None:
        if len(self.features) != len(self.strengths):
            raise ConfigError(f"{len(self.features)} features but {len(self.strengths)} strengths: give one strength per feature")
        for f in self.features:
            if isinstance(f, bool) or not isinstance(f, int) or f < 0:
                raise ConfigError(f"feature id must be a non-negative integer, got {f!r}")
        for s in self.strengths:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ConfigError(f"strength must be a finite number, got {s!r}")
            if abs(s) > MAX_ABS_STRENGTH:
                raise ConfigError(f"strength {s} is out of range: use |strength| <= {MAX_ABS_STRENGTH:g}")
        if self.mode not in ("paper", "additive"):
            raise ConfigError(f"mode {self.mode!r} is unknown: use 'paper' or 'additive'")
        check_whole("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= 5:
            raise ConfigError(f"temperature must be between 0 and 5, got {self.temperature!r}")


@dataclass(frozen=True)
class TrainParams:
    """Hyperparameters of the bundled SAEs (sae-lens TopK)."""

    layers: tuple[int, ...] = (2, 5, 8, 11, 14, 17)
    """Layers (blocks.L.hook_resid_post) to train an SAE at."""
    width: int = 4096
    """Dictionary size d_sae."""
    k: int = 64
    """TopK sparsity."""
    tokens: int = 2_700_000
    """Distinct corpus tokens whose activations are collected (BOS and special tokens excluded)."""
    epochs: float = 5.0
    """Passes over the collected activations; token-visits = tokens × epochs."""
    context_size: int = 128
    """Tokens per sequence when collecting activations."""
    batch_size: int = 2048
    """Training batch in tokens."""
    lr: float = 4e-4
    """Adam learning rate."""
    seed: int = 0
    """Seeds SAE initialisation and batch order."""
    heldout_tokens: int = 140_000
    """Held-out tokens for the quality metrics (dead features need >= 100k)."""
    extra: dict = field(default_factory=dict)
    """Free-form notes stored in the manifest."""

    def __post_init__(self) -> None:
        if not self.layers or any(not isinstance(l, int) or l < 0 for l in self.layers):
            raise ConfigError(f"layers must be non-negative integers, got {self.layers!r}")
        if self.width < 16 or self.k < 1 or self.k > self.width:
            raise ConfigError(f"need width >= 16 and 1 <= k <= width, got width={self.width}, k={self.k}")
        if self.tokens < self.batch_size:
            raise ConfigError(f"tokens ({self.tokens}) must be at least one batch ({self.batch_size})")
        if self.epochs <= 0:
            raise ConfigError("epochs must be positive")


@dataclass(frozen=True)
class ClusterParams:
    """Where and how the tasks run."""

    address: str | None = None
    """A running cluster's address (``HOST:PORT`` of ``ray start --head``, ``ray://HOST:PORT`` or ``auto``); None
    starts a local cluster on this machine."""
    num_cpus: int | None = None
    """CPUs of a local cluster (None: all of this machine's)."""
    cpus_per_task: float = 1.0
    """CPUs each task reserves (and the torch threads it uses)."""
    gpus_per_task: float | None = None
    """GPUs each task reserves; None: 1 when the cluster has GPUs, else 0."""
    max_retries: int = 3
    """Times Ray reruns a task whose worker died (0: fail at once; the job can be rerun to resume)."""
    shard_sequences: int = 512
    """Corpus sequences per activation-pass task (rounded up to a multiple of the pass's batch)."""
    group_width: int = 65536
    """At most this many SAE latents (summed over SAEs) per activation-pass task, to bound a worker's memory."""

    def __post_init__(self) -> None:
        if self.address is not None and not self.address.strip():
            raise ConfigError("--ray ADDRESS: the address is empty; give HOST:PORT, ray://HOST:PORT, auto, or nothing for a local cluster")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"the local Ray cluster needs at least 1 CPU, got {self.num_cpus}")
        if self.cpus_per_task <= 0:
            raise ConfigError(f"cpus_per_task must be positive, got {self.cpus_per_task}")
        if self.gpus_per_task is not None and self.gpus_per_task < 0:
            raise ConfigError(f"gpus_per_task must be >= 0, got {self.gpus_per_task}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.shard_sequences < 1 or self.group_width < 1:
            raise ConfigError("shard_sequences and group_width must be >= 1")
