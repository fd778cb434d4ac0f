"""Parameters of the concept-level run (:class:`EvalParams`) and its method names."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..baselines import LoraParams
from ..config import MAX_ABS_STRENGTH, MAX_NEW_TOKENS_LIMIT, PAPER_STRENGTHS, ConfigError

SAE_METHODS = ("sae_output", "sae_input", "sae_random")
GRID_METHODS = (*SAE_METHODS, "diffmean")
BASELINES = ("unsteered", "prompt", "diffmean", "lora")
METHODS = (*SAE_METHODS, "diffmean", "lora", "prompt", "unsteered")
#: DiffMean coefficients, in units of the mean residual norm at the layer. Gemma's residual norm is dominated
#: by a few massive dimensions, so useful steering sits far below 1: on Gemma 3 270M at layer 8 (mean norm
#: about 5500) 0.05-0.15 steered towards "water"/"music" fluently and 0.2-0.3 broke the text.
DIFFMEAN_COEFFS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.17, 0.25)
PROMPT_TEMPLATE = "Talk about {concept}. {prefix}"
Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalParams:
    """One evaluation run; everything that changes results is here (and checked on --resume)."""

    strengths: tuple[float, ...] = PAPER_STRENGTHS
    """Paper-mode amplifications swept for SAE features."""
    diffmean_coeffs: tuple[float, ...] = DIFFMEAN_COEFFS
    """DiffMean coefficients, relative to the mean residual norm at the layer."""
    methods: tuple[str, ...] = METHODS
    """Methods to run (see METHODS)."""
    n_prefixes: int = 20
    """Prefixes used (the first n of the list); half choose the strength, half are reported."""
    max_new_tokens: int = 24
    """Tokens generated per prefix."""
    top_k: int = 20
    """Logit-lens tokens per feature (candidates and success@k)."""
    seed: int = 0
    """Seeds the prefix split, the random feature, LoRA and the sampled fallback concept texts."""
    ppl_max: float = 1000.0
    """Perplexity at which the fluency factor reaches 0."""
    rep_n: int = 2
    """n of the repeated-n-gram measure."""
    n_concept_texts: int = 32
    """Concept sentences for DiffMean and LoRA."""
    min_concept_texts: int = 8
    """Below this many corpus sentences, generated texts top them up."""
    n_neutral_texts: int = 128
    """Neutral sentences for DiffMean."""
    lora: LoraParams = field(default_factory=LoraParams)
    """The LoRA baseline's adapter and training."""
    full_train_fluency: bool = False
    """Also score the perplexity of train-half rows that do not mention the concept (their combined score is
    0 either way; off, their ppl and fluency are NaN, saving one forward pass per such row)."""
    batch_size: int = 512
    """Most rows per generate call (rows are split into calls of equal size): larger batches decode faster per
    token on a CPU (memory: the KV cache, ≈ 1.1 MB per row of 30 tokens on Gemma 3 270M; the head's logits
    are taken in vocabulary blocks); results do not depend on it. Out of memory, it is halved and retried."""

    concepts_per_batch: int = 3
    """Concepts whose rows share each decode call and perplexity pass (LoRA apart): small calls are slow per
    token on a CPU, so batching concepts speeds the run up; results do not depend on it."""

    def __post_init__(self) -> None:
        for name in ("strengths", "diffmean_coeffs"):
            vals = getattr(self, name)
            if not vals or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals):
                raise ConfigError(f"{name} must be a non-empty list of finite numbers, got {vals!r}")
            if any(abs(v) > MAX_ABS_STRENGTH for v in vals):
                raise ConfigError(f"{name} {vals!r} are out of range: use |value| <= {MAX_ABS_STRENGTH:g}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {unknown or '(none given)'}: use some of {', '.join(METHODS)}")
        if self.n_prefixes < 2:
            raise ConfigError(f"n_prefixes must be at least 2 (one per half), got {self.n_prefixes}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ConfigError(f"max_new_tokens must be from 1 to {MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        if not 1 <= self.top_k <= 1000 or self.rep_n < 1 or self.batch_size < 1 or not self.ppl_max > 1:
            raise ConfigError("need 1 <= top_k <= 1000, rep_n >= 1, batch_size >= 1 and ppl_max > 1")
        if isinstance(self.concepts_per_batch, bool) or not isinstance(self.concepts_per_batch, int) or self.concepts_per_batch < 1:
            raise ConfigError(f"concepts_per_batch must be a whole number >= 1, got {self.concepts_per_batch!r}")

    def key(self) -> dict:
        """The settings that must match for --resume to continue a run."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("concepts_per_batch")
        d["strengths"], d["diffmean_coeffs"], d["methods"] = list(self.strengths), list(self.diffmean_coeffs), sorted(self.methods)
        return d
