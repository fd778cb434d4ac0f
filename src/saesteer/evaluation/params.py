"""Parameters of the concept-level run (:class:`EvalParams`) and its method names.

The SAE methods (see :mod:`.candidates` for the candidates and picks):

- ``sae_activation``: the activation pick, the input-side candidate that fires most reliably on the concept;
- ``sae_output``: the output-score pick, the highest output score over both candidate sets;
- ``sae_filtered``: every input-side candidate with output score >= tau (the paper's filter), each evaluated
  on its own; the concept's result is the mean over them;
- ``sae_random``: a seeded random member of both candidate sets.

Runs of the previous protocol (logit-lens candidates only) used ``sae_output``, ``sae_input`` and
``sae_random``; they are still read (:data:`PREVIOUS_METHODS`), not resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from ..baselines import LoraParams
from ..config import MAX_NEW_TOKENS_LIMIT, PAPER_STRENGTHS, ConfigError, check_numbers, check_whole
from .candidates import DEFAULT_TAU, DEFAULT_THETA, CandidateParams

SAE_METHODS = ("sae_activation", "sae_output", "sae_filtered", "sae_random")
GRID_METHODS = (*SAE_METHODS, "diffmean")
BASELINES = ("unsteered", "prompt", "diffmean", "lora")
METHODS = (*SAE_METHODS, "diffmean", "lora", "prompt", "unsteered")
#: The SAE methods of the previous protocol (candidates from the logit lens only); its runs are read, not resumed.
PREVIOUS_SAE_METHODS = ("sae_output", "sae_input", "sae_random")
PREVIOUS_METHODS = (*PREVIOUS_SAE_METHODS, "diffmean", "lora", "prompt", "unsteered")
#: Every method a run folder may hold, in display order (this protocol's, then the previous one's ``sae_input``).
KNOWN_METHODS = (*SAE_METHODS, "sae_input", "diffmean", "lora", "prompt", "unsteered")
KNOWN_SAE_METHODS = (*SAE_METHODS, "sae_input")
#: ``meta.json``'s ``protocol`` of a run of this protocol; runs without it are of the previous one.
PROTOCOL = "input-side-v2"
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
    """Logit-lens tokens per feature (output-side candidates and success@k)."""
    seed: int = 0
    """Seeds the prefix split, the random pick, LoRA and the sampled fallback concept texts."""
    theta: float = DEFAULT_THETA
    """Input-side candidate: share of its top contexts that peak on a concept token, at least this (0 < theta <= 1)."""
    tau: float = DEFAULT_TAU
    """Output filter of sae_filtered: input-side candidates with output score >= tau are steered (tau >= 0)."""
    max_contexts: int = 100
    """Top contexts per feature counted for the firing share (at most)."""
    min_contexts: int = 10
    """Features with fewer top contexts are never input-side candidates."""
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
            check_numbers(name, getattr(self, name))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            old = [m for m in unknown if m in PREVIOUS_METHODS]
            why = f" ({', '.join(old)} belonged to the previous protocol)" if old else ""
            raise ConfigError(f"unknown method(s) {unknown or '(none given)'}{why}: use some of {', '.join(METHODS)}")
        check_whole("n_prefixes", self.n_prefixes, 2)
        check_whole("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
        check_whole("top_k", self.top_k, 1, 1000)
        for name in ("rep_n", "batch_size", "concepts_per_batch"):
            check_whole(name, getattr(self, name))
        if not self.ppl_max > 1:
            raise ConfigError(f"ppl_max must be > 1, got {self.ppl_max!r}")
        self.candidate_params()  # validates theta, tau, max_contexts and min_contexts

    def candidate_params(self) -> CandidateParams:
        """How this run finds each concept's candidates (:func:`.candidates.concept_candidates`)."""
        return CandidateParams(theta=self.theta, tau=self.tau, top_k=self.top_k, max_contexts=self.max_contexts,
                               min_contexts=self.min_contexts, seed=self.seed)

    @classmethod
    def from_key(cls, key: dict) -> EvalParams:
        """The parameters a run's ``meta.json`` ``params`` (:meth:`key`) records; unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(key) - names)
        if extra:
            raise ConfigError(f"these run parameters are not EvalParams fields: {', '.join(extra)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in key.items()}
        if isinstance(d.get("lora"), dict):
            d["lora"] = LoraParams(**d["lora"])
        if "methods" in d:
            d["methods"] = tuple(m for m in METHODS if m in set(d["methods"])) or d["methods"]
        return cls(**d)

    def key(self) -> dict:
        """The settings that must match for --resume to continue a run."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("concepts_per_batch")
        d["strengths"], d["diffmean_coeffs"], d["methods"] = list(self.strengths), list(self.diffmean_coeffs), sorted(self.methods)
        return d
