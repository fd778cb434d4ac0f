"""Steering evaluation: SAE features chosen by output score, by input score and at random, against baselines.

Protocol (Arad, Mueller & Belinkov 2025, with AxBench's held-out strength selection):

1. A *concept* is a word or short phrase. Its tokens are the single-token encodings of the concept as given,
   lower-cased and capitalised, each with and without a leading space (a phrase with no single-token form
   falls back to the first token of each of those forms). Its *candidate features* are those whose
   logit-lens top-k (k = 20) contains one of these tokens.
2. Among the candidates, ``sae_input`` takes the highest input score, ``sae_output`` the highest output score
   and ``sae_random`` a seeded random one. A concept without candidates is reported as skipped.
3. The prefixes are split once, seeded, into two halves. On the *train* half every grid method is run at
   every strength (SAE features: paper mode over ``config.PAPER_STRENGTHS``; DiffMean: additive over
   coefficients relative to the residual norm); the strength with the best mean combined score is chosen
   there, and the method is reported at that strength on the *test* half only. Baselines without a grid
   (``unsteered``, ``prompt``: "Talk about X." before the prefix, ``lora``) are reported on the test half.
   All generations are greedy. Concepts are taken ``EvalParams.concepts_per_batch`` at a time and every
   phase batches all their rows: one decode call (of at most ``batch_size`` rows) for every prefix ×
   strength × method of the group's train half, one for its test half (LoRA rows included, each concept's
   adapter applied to its own rows), one perplexity pass per phase. Rows do not interact, so each concept's
   results are those of running it alone (tested).

Metrics of one generation (the continuation only, never the prefix):

- ``mentions``: number of whole-word, case-insensitive matches of the concept (plural ``s``/``es``
  allowed; see ``baselines.mention_pattern``). ``concept_score`` = 1 if ``mentions`` > 0, else 0. Both
  are defined the same way for every method, so they compare methods.
- ``success_k``: the paper's generation success@k, as a count: how many distinct strings of the target set
  occur in the text as whole words (case-insensitive). For SAE rows the target set is the feature's top-k
  logit-lens tokens plus the concept's tokens; for the other methods, the concept's tokens only. A token's
  string is its decoded text, stripped and lower-cased; strings shorter than 2 characters or without a
  letter or digit are dropped (punctuation would match everywhere).
- ``ppl``: perplexity of the continuation's tokens under the *unsteered* model, conditioned on BOS + the
  neutral prefix (also for ``prompt``, whose instruction is not shown to the scorer); NaN for an empty one.
- ``repetition``: share of repeated word n-grams (n = 2): 1 − distinct / total; 0 below two words.
- ``fluency`` = (1 − repetition) · ppl_factor, ppl_factor = clip((ln P_max − ln ppl) / (ln P_max − ln P_ref),
  0, 1): 1 for text at least as predictable as the unsteered model's own continuations (P_ref, their
  median perplexity in this run), falling linearly in log-perplexity to 0 at P_max = 1000; 0 for empty text.
- ``combined`` = concept_score · fluency, in [0, 1]: the score used to choose strengths and to rank methods.
  On the train half, rows that do not mention the concept have combined = 0 whatever their fluency, so their
  perplexity is not computed (ppl and fluency NaN) unless ``EvalParams.full_train_fluency``.

Results are written incrementally under ``out/units/`` per (concept, method), so an interrupted run resumes;
:func:`load_results` reads a finished or partial run and the ``fig_*`` functions plot it.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .baselines import (
    LoraParams,
    LoraReport,
    add_vector,
    diffmean,
    generated_texts,
    lora_adapter,
    lora_rows,
    mention_pattern,
    mine_sentences,
    residual_mean,
)
from .config import MAX_ABS_STRENGTH, MAX_NEW_TOKENS_LIMIT, PAPER_STRENGTHS, ConfigError
from .corpus import Doc
from .judge import Judge
from .memory import for_each_batch
from .models import LoadedModel
from . import paths
from .paths import EVAL_ASSETS, eval_cache
from .saes import LoadedSae

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


def read_list(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, without those starting with '#'."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: give a text file with one entry per line")
    return [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip() and not s.lstrip().startswith("#")]


def default_concepts() -> list[str]:
    return read_list(EVAL_ASSETS / "concepts.txt")


def default_prefixes() -> list[str]:
    return read_list(EVAL_ASSETS / "prefixes.txt")


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


# ---------------------------------------------------------------------------------------------------
# Concepts, candidates and the three feature choices


def concept_variants(concept: str) -> list[str]:
    base = concept.strip()
    forms = dict.fromkeys([base, base.lower(), base[:1].upper() + base[1:].lower()])
    return [space + f for f in forms for space in ("", " ")]


def concept_token_ids(tokenizer, concept: str) -> list[int]:
    """Token ids of the concept (see the module docstring); special tokens (also <unk>) never count."""
    special = set(tokenizer.all_special_ids)
    encodings = [list(tokenizer(v, add_special_tokens=False).input_ids) for v in concept_variants(concept)]
    ids = {e[0] for e in encodings if len(e) == 1 and e[0] not in special}
    if not ids and " " in concept.strip():
        ids = {e[0] for e in encodings if e and e[0] not in special}
    return sorted(ids)


@dataclass
class FeatureScores:
    """What feature selection needs: each feature's logit-lens top tokens, output score and input score."""

    features: np.ndarray  # (n,) int64
    top_ids: np.ndarray  # (n, k) int64, best first
    output_score: np.ndarray  # (n,) float64
    input_score: np.ndarray  # (n,) float64, NaN where a feature has too few contexts
    source: str = ""

    @classmethod
    def from_table(cls, table: pd.DataFrame, lens, source: str = "") -> FeatureScores:
        """From a feature table (columns feature, output_score, input_score) and a ``scores.LogitLens``."""
        missing = {"feature", "output_score", "input_score"} - set(table.columns)
        if missing:
            raise ConfigError(f"the feature table lacks column(s) {sorted(missing)}")
        t = table.set_index("feature")
        feats = np.asarray(lens.features, dtype=np.int64)
        t = t.reindex(feats)
        return cls(feats, np.asarray(lens.top_ids), t["output_score"].to_numpy(float), t["input_score"].to_numpy(float), source)


@dataclass
class Selection:
    concept: str
    token_ids: list[int]
    candidates: list[int]
    picks: dict[str, int]  # method -> feature
    skipped: dict[str, str]  # method -> reason


def _argmax_finite(values: np.ndarray) -> int | None:
    if not np.isfinite(values).any():
        return None
    return int(np.nanargmax(np.where(np.isfinite(values), values, -np.inf)))


def select_features(concept: str, token_ids: Sequence[int], scores: FeatureScores, top_k: int = 20, seed: int = 0) -> Selection:
    """Candidates of ``concept`` and the feature each SAE method steers with (ties: lowest feature id)."""
    order = np.argsort(scores.features, kind="stable")
    feats = scores.features[order]
    mask = np.isin(scores.top_ids[order, :top_k], np.asarray(token_ids, dtype=np.int64)).any(axis=1)
    cand = feats[mask]
    picks: dict[str, int] = {}
    skipped: dict[str, str] = {}
    if len(cand) == 0:
        reason = f"no feature has the concept among its top-{top_k} logit-lens tokens"
        return Selection(concept, list(token_ids), [], {}, {m: reason for m in SAE_METHODS})
    for method, values in (("sae_output", scores.output_score[order][mask]), ("sae_input", scores.input_score[order][mask])):
        i = _argmax_finite(values)
        if i is None:
            skipped[method] = f"no candidate feature has an {method.removeprefix('sae_')} score"
        else:
            picks[method] = int(cand[i])
    rng = np.random.default_rng([seed, zlib.crc32(concept.encode())])
    picks["sae_random"] = int(cand[rng.integers(len(cand))])
    return Selection(concept, list(token_ids), [int(f) for f in cand], picks, skipped)


# ---------------------------------------------------------------------------------------------------
# AxBench split and strength choice


def split_prefixes(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of prefix indices 0..n-1 into (train, test): floor(n/2) and ceil(n/2) indices, sorted."""
    if n < 2:
        raise ConfigError(f"need at least 2 prefixes to split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return sorted(int(i) for i in perm[:half]), sorted(int(i) for i in perm[half:])


def best_strength(frame: pd.DataFrame, metric: str = "combined") -> float:
    """The strength with the highest mean ``metric`` (NaN rows ignored); ties go to the smallest |strength|,
    then the smaller value. ``frame`` has columns strength and ``metric``."""
    if frame.empty:
        raise ValueError("no rows to choose a strength from")
    means = frame.groupby("strength")[metric].mean()
    if means.isna().all():
        return float(min(means.index, key=lambda s: (abs(s), s)))
    top = means.max()
    ties = [s for s, v in means.items() if v >= top - 1e-12]
    return float(min(ties, key=lambda s: (abs(s), s)))


# ---------------------------------------------------------------------------------------------------
# Metrics


def normalise_token(text: str) -> str:
    return text.strip().lower()


def target_strings(strings: Iterable[str]) -> list[str]:
    """Distinct normalised strings kept as success@k targets (see the module docstring)."""
    out = {normalise_token(s) for s in strings}
    return sorted(s for s in out if len(s) >= 2 and any(ch.isalnum() for ch in s))


def success_at_k(text: str, targets: Sequence[str]) -> int:
    """How many of ``targets`` (normalised strings) occur in ``text`` as whole words, case-insensitively."""
    low = text.lower()
    return sum(1 for t in targets if re.search(r"(?<!\w)" + re.escape(t) + r"(?!\w)", low))


def concept_mentions(text: str, concept: str) -> int:
    return len(mention_pattern(concept).findall(text))


def repetition(text: str, n: int = 2) -> float:
    """Share of repeated word n-grams: 1 − distinct/total; 0 when the text has fewer than n words."""
    words = re.findall(r"\w+", text.lower())
    grams = list(zip(*(words[i:] for i in range(n))))
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def ppl_factor(ppl: float, ppl_ref: float, ppl_max: float = 1000.0) -> float:
    """1 at or below ``ppl_ref``, linear in log-perplexity down to 0 at ``ppl_max``; 0 for NaN (empty text)."""
    if not math.isfinite(ppl):
        return 0.0
    if ppl_ref >= ppl_max:
        return 1.0 if ppl <= ppl_ref else 0.0
    return float(np.clip((math.log(ppl_max) - math.log(ppl)) / (math.log(ppl_max) - math.log(ppl_ref)), 0.0, 1.0))


def fluency(rep: float, pf: float) -> float:
    return (1.0 - rep) * pf


VOCAB_BLOCK = 2048


def _target_logprobs(lm: LoadedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) (positions,) in float32 under the head of ``lm`` for final-normed ``hidden`` (positions, d).

    On a CPU the vocabulary is taken in blocks of ``VOCAB_BLOCK`` rows with a running log-sum-exp, so that the
    (positions, vocab) logits never exist at once: cache-sized blocks make the pass ≈ 1.2× faster than one
    product writing 0.5 GB of logits (the tests compare it with a full log-softmax in float64).
    """
    from .fasthead import vocab_blocks

    run_max = torch.full((len(hidden),), -math.inf, device=hidden.device)
    run_sum = torch.zeros(len(hidden), device=hidden.device)
    picked = torch.empty(len(hidden), device=hidden.device)
    for b, logits in vocab_blocks(hidden, lm.lm_head.weight, getattr(lm.lm_head, "bias", None), VOCAB_BLOCK):
        logits = logits.float()
        if lm.softcap:
            logits = torch.tanh(logits / lm.softcap) * lm.softcap
        new_max = torch.maximum(run_max, logits.amax(-1))
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(-1)
        run_max = new_max
        here = (targets >= b) & (targets < b + logits.shape[1])
        if bool(here.any()):
            rows = here.nonzero()[:, 0]
            picked[rows] = logits[rows, targets[rows] - b]
    return picked - (run_max + torch.log(run_sum))


@torch.no_grad()
def continuation_nll(lm: LoadedModel, prefixes: Sequence[str], continuations: Sequence[str], batch_size: int = 64, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean negative log-likelihood per continuation token under the unsteered model, given the prefix (with the
    tokenizer's BOS), and the number of continuation tokens; NaN where the continuation is empty.

    One right-padded forward per batch; the unembedding runs only at the positions that predict
    continuation tokens (the decoder's last hidden state is already final-normed). Out of memory, the batch
    is halved and retried.
    """
    tok = lm.tokenizer
    rows = [(list(tok(p).input_ids), list(tok(c, add_special_tokens=False).input_ids) if c else []) for p, c in zip(prefixes, continuations)]
    nll = np.full(len(rows), np.nan)
    count = np.array([len(c) for _, c in rows], dtype=np.int64)
    todo = sorted((i for i in range(len(rows)) if count[i] > 0), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    decoder = lm.model.get_decoder()

    def step(start: int, stop: int) -> None:
        idx = todo[start:stop]
        seqs = [rows[i][0] + rows[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        b_idx, p_idx, targets = [], [], []
        for r, (i, s) in enumerate(zip(idx, seqs)):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            n_pre, n_cont = len(rows[i][0]), len(rows[i][1])
            b_idx += [r] * n_cont
            p_idx += list(range(n_pre - 1, n_pre + n_cont - 1))
            targets += rows[i][1]
        with lm.lock:
            hidden = decoder(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).last_hidden_state
        h = hidden[torch.tensor(b_idx), torch.tensor(p_idx)]  # (tokens, d_model)
        tgt = torch.tensor(targets, device=lm.device)
        logp = torch.empty(len(targets), dtype=torch.float64)
        for s in range(0, len(targets), chunk):
            logp[s : s + chunk] = _target_logprobs(lm, h[s : s + chunk], tgt[s : s + chunk]).double().cpu()
        per_row = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, torch.tensor(b_idx), logp)
        for r, i in enumerate(idx):
            nll[i] = -float(per_row[r]) / count[i]

    for_each_batch(len(todo), batch_size, step, "texts")
    return nll, count


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Row:
    method: str
    feature: int
    strength: float
    split: str
    prefix_idx: int
    prompt: str
    concept: str = ""


def slug(concept: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-")[:40] or "concept"
    return f"{base}-{zlib.crc32(concept.encode()):08x}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


class Evaluation:
    """One evaluation run of one SAE layer, writing under ``out`` (see :func:`run_evaluation`)."""

    def __init__(
        self,
        lm: LoadedModel,
        sae: LoadedSae,
        scores: FeatureScores,
        prefixes: Sequence[str],
        out: str | Path,
        params: EvalParams = EvalParams(),
        resume: bool = False,
        docs: Iterable[Doc] | None = None,
        judge: Judge | None = None,
        log: Log | None = None,
    ):
        if len(prefixes) < params.n_prefixes:
            raise ConfigError(f"{len(prefixes)} prefixes given but n_prefixes={params.n_prefixes}: give more prefixes or lower --n-prefixes")
        if scores.top_ids.shape[1] < params.top_k:
            raise ConfigError(f"the feature data has {scores.top_ids.shape[1]} logit-lens tokens per feature, the evaluation needs top_k={params.top_k}")
        self.lm, self.sae, self.scores, self.params = lm, sae, scores, params
        self.prefixes = list(prefixes[: params.n_prefixes])
        self.out = Path(out)
        self.units = self.out / "units"
        self.docs = docs
        self.judge = judge
        self.log = log or (lambda _msg: None)
        self.train, self.test = split_prefixes(len(self.prefixes), params.seed)
        self._nll_cache: dict[tuple[int, str], tuple[float, int]] = {}
        self._batch_size = params.batch_size  # rows per generate call; halved for the rest of the run out of memory
        self._neutral = None
        self._base: pd.DataFrame | None = None
        self._texts: dict[str, dict] | None = None
        self._prepare(resume)

    # -- bookkeeping -------------------------------------------------------------------------------

    def _meta(self) -> dict:
        from .store import model_fingerprint, sae_fingerprint

        return {
            "model": self.lm.name,
            "model_fingerprint": model_fingerprint(self.lm),
            "sae_id": self.sae.id,
            "sae_fingerprint": sae_fingerprint(self.sae),
            "layer": self.sae.layer,
            "hook_name": self.sae.hook_name,
            "params": self.params.key(),
            "prefixes": self.prefixes,
            "train_prefixes": self.train,
            "test_prefixes": self.test,
            "feature_scores": self.scores.source,
            "judge": getattr(self.judge, "name", None),
        }

    def _prepare(self, resume: bool) -> None:
        meta_path = self.out / "meta.json"
        fresh = self._meta()
        if meta_path.exists() or (self.units.exists() and any(self.units.iterdir())):
            if not resume:
                raise ConfigError(f"{self.out} already holds evaluation results: pass --resume to continue them, or choose another --out")
            old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            same = ("model", "model_fingerprint", "sae_id", "sae_fingerprint", "layer", "prefixes", "feature_scores")
            diff = [k for k in same if old.get(k) != fresh[k]]
            # Units are independent per method, so a resumed run may add or drop methods.
            diff += [f"params.{k}" for k in fresh["params"] if k != "methods" and old.get("params", {}).get(k) != fresh["params"][k]]
            if diff:
                raise ConfigError(f"cannot resume {self.out}: it was run with different {', '.join(diff)}; use the same settings or another --out")
            fresh["ppl_ref"] = old.get("ppl_ref")
        self.units.mkdir(parents=True, exist_ok=True)
        self.meta = fresh
        _write_json(meta_path, self.meta)

    def unit_path(self, concept: str, method: str) -> Path:
        return self.units / f"{slug(concept)}__{method}"

    def done(self, concept: str, method: str) -> bool:
        return self.unit_path(concept, method).with_suffix(".json").exists()

    def _save_unit(self, concept: str, method: str, info: dict, rows: pd.DataFrame | None) -> None:
        base = self.unit_path(concept, method)
        if rows is not None:
            _write_parquet(base.with_suffix(".parquet"), rows)
        # The JSON is written last: it is the marker that the unit is complete.
        _write_json(base.with_suffix(".json"), {"concept": concept, "method": method, **info})

    # -- generation ------------------------------------------------------------------------------

    def _generate(self, rows: list[_Row], feats: Sequence[int] = (), vectors: dict[str, torch.Tensor] | None = None,
                  loras: dict[str, LoraReport] | None = None) -> tuple[list[str], float, int]:
        """Continuations of ``rows`` in calls of at most ``batch_size`` rows. A row of an SAE method steers (paper
        mode) with its own feature at its strength and 0 for the others; a DiffMean row adds ``strength ·
        vectors[row.concept]`` at every position; a LoRA row runs with the adapter ``loras[row.concept]`` on its
        row only (``baselines.lora_rows``); any other row is unsteered. Mixing them (and concepts) in one call
        is exact: a zero strength or coefficient leaves its row unchanged, rows do not interact, and larger
        batches decode faster per token. Rows that would decode the same thing (two methods or concepts that
        picked the same feature) are decoded once."""
        from .steering import generate

        def key(r: _Row) -> tuple:
            if r.method in SAE_METHODS:
                return ("sae", r.feature, r.strength, r.prompt)
            if r.method in ("diffmean", "lora"):
                return (r.method, r.concept, r.strength, r.prompt)
            return ("plain", r.prompt)

        unique = list(dict.fromkeys(key(r) for r in rows))
        feats = list(feats)
        sae_rows = torch.zeros(len(unique), len(feats))
        vec_rows = torch.zeros(len(unique), self.lm.d_model)
        for i, k in enumerate(unique):
            if k[0] == "sae":
                sae_rows[i, feats.index(k[1])] = k[2]
            elif k[0] == "diffmean":
                vec_rows[i] = k[2] * vectors[k[1]].float().cpu()
        texts: list[str] = [""] * len(unique)
        t0 = time.perf_counter()
        common = {"max_new_tokens": self.params.max_new_tokens, "temperature": 0.0, "seed": self.params.seed}

        def step(s: int, e: int) -> None:
            prompts = [k[-1] for k in unique[s:e]]
            steer = {"sae": self.sae, "features": feats, "strengths": sae_rows[s:e], "mode": "paper"} if feats else {}
            adapters: dict[str, list[int]] = {}
            for j, k in enumerate(unique[s:e]):
                if k[0] == "lora":
                    adapters.setdefault(k[1], []).append(j)
            with ExitStack() as stack:
                if bool(vec_rows[s:e].any()):
                    stack.enter_context(add_vector(self.lm, self.sae.layer, vec_rows[s:e], torch.ones(e - s)))
                if adapters:
                    stack.enter_context(lora_rows(self.lm, [(loras[c], idx) for c, idx in adapters.items()]))
                texts[s:e] = generate(self.lm, prompts, **steer, **common)

        # Calls of equal size (600 rows at 512 a call: 300 + 300, not 512 + a slow 88). Out of memory, the
        # batch is halved for the rest of the run (greedy rows do not depend on their batch).
        n = len(unique)
        even = -(-n // -(-n // self._batch_size)) if n else self._batch_size
        used = for_each_batch(n, even, step, "prompts")
        self._batch_size = min(self._batch_size, used) if used < even else self._batch_size
        by_key = dict(zip(unique, texts))
        return [by_key[key(r)] for r in rows], time.perf_counter() - t0, n * self.params.max_new_tokens

    def _nll(self, prefix_idx: Sequence[int], texts: Sequence[str]) -> list[tuple[float, int]]:
        """(mean NLL, tokens) per text, each distinct (prefix, text) scored once per run."""
        keys = list(zip(prefix_idx, texts))
        todo = list(dict.fromkeys(k for k in keys if k not in self._nll_cache))
        if todo:
            nll, count = continuation_nll(self.lm, [self.prefixes[i] for i, _ in todo], [t for _, t in todo])
            for k, v, c in zip(todo, nll, count):
                self._nll_cache[k] = (float(v), int(c))
        return [self._nll_cache[k] for k in keys]

    def _unsteered(self) -> pd.DataFrame:
        """Unsteered continuations of every prefix (concept-independent, so generated once per run)."""
        if self._base is not None:
            return self._base
        path = self.units / "_unsteered.parquet"
        if path.exists():
            frame = pd.read_parquet(path)
        else:
            texts, secs, steps = self._generate([_Row("unsteered", -1, 0.0, "", i, p) for i, p in enumerate(self.prefixes)])
            frame = pd.DataFrame({"prefix_idx": range(len(self.prefixes)), "text": texts})
            frame["gen_seconds"], frame["row_steps"] = secs, steps
            _write_parquet(path, frame)
        nll = self._nll([int(i) for i in frame["prefix_idx"]], list(frame["text"]))
        if self.meta.get("ppl_ref") is None:
            ppl = [math.exp(v) for v, n in nll if n]
            self.meta["ppl_ref"] = float(np.median(ppl)) if ppl else 1.0
            _write_json(self.out / "meta.json", self.meta)
        self._base = frame
        return frame

    # -- concept texts --------------------------------------------------------------------------

    def _concept_texts(self, concepts: Sequence[str]) -> dict[str, dict]:
        """Concept sentences (mined once per run for all concepts, cached in concept_texts.json) and neutral ones."""
        if self._texts is not None:
            return self._texts
        path = self.out / "concept_texts.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        need = [c for c in concepts if c not in stored.get("concepts", {})]
        if need or "neutral" not in stored:
            from .corpus import iter_bundled

            self.log(f"mining concept sentences for {len(need)} concept(s) from the corpus")
            docs = self.docs if self.docs is not None else iter_bundled("train")
            mined = mine_sentences(need, docs, self.params.n_concept_texts, self.params.n_neutral_texts, self.params.seed)
            stored.setdefault("concepts", {})
            for c in need:
                stored["concepts"][c] = {"texts": mined.positive[c], "n_corpus": len(mined.positive[c]), "n_generated": 0}
            stored.setdefault("neutral", mined.neutral)
            _write_json(path, stored)
        self._texts = stored
        return stored

    def _texts_for(self, concept: str) -> dict:
        stored = self._concept_texts([concept])
        entry = stored["concepts"][concept]
        short = self.params.min_concept_texts - entry["n_corpus"]
        if short > 0 and entry["n_generated"] == 0:
            self.log(f"{concept}: {entry['n_corpus']} corpus sentences; generating {short} more")
            gen = generated_texts(self.lm, concept, self.prefixes, short, seed=self.params.seed, max_new_tokens=32)
            entry["texts"] = entry["texts"] + gen
            entry["n_generated"] = len(gen)
            _write_json(self.out / "concept_texts.json", stored)
        return entry

    def _neutral_mean(self):
        if self._neutral is None:
            neutral = self._concept_texts([])["neutral"]
            if not neutral:
                raise ConfigError("the corpus gave no neutral sentences for DiffMean")
            self._neutral = residual_mean(self.lm, self.sae.layer, neutral)
        return self._neutral

    # -- scoring --------------------------------------------------------------------------------

    def _targets(self, concept: str, token_ids: Sequence[int], feature: int) -> list[str]:
        tok = self.lm.tokenizer
        ids = list(token_ids)
        if feature >= 0:
            row = int(np.flatnonzero(self.scores.features == feature)[0])
            ids += [int(t) for t in self.scores.top_ids[row, : self.params.top_k]]
        return target_strings(tok.batch_decode([[i] for i in ids]))

    def _score(self, concept: str, token_ids: Sequence[int], rows: list[_Row], texts: list[str]) -> pd.DataFrame:
        mentions = [concept_mentions(t, concept) for t in texts]
        sel = [i for i, (r, m) in enumerate(zip(rows, mentions)) if self._needs_fluency(r, m)]
        nll = dict(zip(sel, self._nll([rows[i].prefix_idx for i in sel], [texts[i] for i in sel])))
        targets: dict[int, list[str]] = {}
        ref = self.meta["ppl_ref"]
        out = []
        for i, (r, text, m) in enumerate(zip(rows, texts, mentions)):
            if r.feature not in targets:
                targets[r.feature] = self._targets(concept, token_ids, r.feature)
            rep = repetition(text, self.params.rep_n)
            cs = float(m > 0)
            if i in nll:
                v, n_tok = nll[i]
                ppl = math.exp(v) if n_tok else math.nan
                flu = fluency(rep, ppl_factor(ppl, ref, self.params.ppl_max)) if n_tok else 0.0
                comb = cs * flu
            else:
                n_tok = len(self.lm.tokenizer(text, add_special_tokens=False).input_ids) if text else 0
                ppl, flu, comb = math.nan, math.nan, 0.0
            out.append({
                "concept": concept, "method": r.method, "feature": r.feature, "strength": float(r.strength),
                "split": r.split, "prefix_idx": r.prefix_idx, "prefix": self.prefixes[r.prefix_idx], "prompt": r.prompt,
                "text": text, "n_tokens": n_tok, "mentions": m, "concept_score": cs,
                "success_k": success_at_k(text, targets[r.feature]), "ppl": ppl, "repetition": rep,
                "fluency": flu, "combined": comb,
            })
        return pd.DataFrame(out)

    def _judge(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.judge is None or frame.empty:
            return frame
        scores = [self.judge.rate(c, p, t) for c, p, t in zip(frame["concept"], frame["prefix"], frame["text"])]
        frame = frame.copy()
        frame["judge_concept"] = [s.concept for s in scores]
        frame["judge_instruction"] = [s.instruction for s in scores]
        frame["judge_fluency"] = [s.fluency for s in scores]
        frame["judge_score"] = [s.score for s in scores]
        return frame

    # -- one concept ----------------------------------------------------------------------------

    def _needs_fluency(self, row: _Row, mentions: int) -> bool:
        # A train row that does not mention the concept has combined score 0 whatever its fluency, so its
        # perplexity (a forward pass about as costly as generating the row) is skipped unless asked for.
        return self.params.full_train_fluency or row.split != "train" or mentions > 0

    def _prefetch_nll(self, rows: list[_Row], texts: list[str]) -> None:
        """Score, in one batched pass, the perplexities that :meth:`_score` will need for these rows (of any
        concepts); results go to the per-run cache, so the per-concept scoring then only looks them up."""
        need = [(r.prefix_idx, t) for r, t in zip(rows, texts) if self._needs_fluency(r, concept_mentions(t, r.concept))]
        if need:
            self._nll([i for i, _ in need], [t for _, t in need])

    def run_group(self, items: Sequence[tuple[Selection, Sequence[str]]]) -> dict:
        """Run the pending methods of a group of concepts ((selection, methods) each) with their rows batched
        together, phase by phase: one decode call (or a few of ``batch_size`` rows) for every train row of
        every concept, one for every test row, one perplexity pass per phase; LoRA apart (its adapter changes
        the whole model, so each concept's LoRA rows decode alone). Rows never interact, so each concept's
        results are those of running it alone. Returns the group's timing record."""
        p = self.params
        t_start = time.perf_counter()
        timing = {"concepts": [sel.concept for sel, _ in items], "gen_seconds": 0.0, "row_steps": 0, "lora_seconds": 0.0}

        def gen(rows: list[_Row], **kw) -> list[str]:
            texts, secs, steps = self._generate(rows, **kw)
            timing["gen_seconds"] += secs
            timing["row_steps"] += steps
            return texts

        frames: dict[str, dict[str, list[pd.DataFrame]]] = {}
        info: dict[str, dict[str, dict]] = {}
        vectors: dict[str, torch.Tensor] = {}
        feats: list[int] = []
        train_rows: list[_Row] = []
        for sel, methods in items:
            c = sel.concept
            frames[c] = {m: [] for m in methods}
            info[c] = {m: {"status": "done", "n_candidates": len(sel.candidates), "concept_token_ids": sel.token_ids} for m in methods}
            sae_methods = [m for m in methods if m in SAE_METHODS]
            feats += [sel.picks[m] for m in sae_methods]  # two methods (or concepts) may pick the same feature
            for m in sae_methods:
                i = int(np.flatnonzero(self.scores.features == sel.picks[m])[0])
                info[c][m].update(feature=sel.picks[m], output_score=float(self.scores.output_score[i]), input_score=float(self.scores.input_score[i]))
            if "diffmean" in methods:
                entry = self._texts_for(c)
                dm = diffmean(residual_mean(self.lm, self.sae.layer, entry["texts"]), self._neutral_mean())
                info[c]["diffmean"].update(n_corpus_texts=entry["n_corpus"], n_generated_texts=entry["n_generated"], diffmean_norm=dm.raw_norm, resid_norm=dm.resid_norm)
                vectors[c] = dm.vector(1.0)
                train_rows += [_Row("diffmean", -1, k, "train", i, self.prefixes[i], c) for k in p.diffmean_coeffs for i in self.train]
            # Train half: every grid method at every strength.
            train_rows += [_Row(m, sel.picks[m], s, "train", i, self.prefixes[i], c) for m in sae_methods for s in p.strengths for i in self.train]
        feats = list(dict.fromkeys(feats))

        def by_concept(rows: list[_Row], texts: list[str]) -> dict[str, tuple[list[_Row], list[str]]]:
            out: dict[str, tuple[list[_Row], list[str]]] = {}
            for r, t in zip(rows, texts):
                rs, ts = out.setdefault(r.concept, ([], []))
                rs.append(r)
                ts.append(t)
            return out

        best: dict[str, dict[str, float]] = {sel.concept: {} for sel, _ in items}
        if train_rows:
            texts = gen(train_rows, feats=feats, vectors=vectors)
            self._prefetch_nll(train_rows, texts)
            trains = by_concept(train_rows, texts)
            for sel, _ in items:
                part = trains.get(sel.concept)
                if part is None:
                    continue
                frame = self._score(sel.concept, sel.token_ids, *part)
                for m in frame["method"].unique():
                    frames[sel.concept][m].append(frame[frame["method"] == m])
                    best[sel.concept][m] = best_strength(frame[frame["method"] == m])

        # Test half: every method at its chosen strength.
        test_rows: list[_Row] = []
        for sel, methods in items:
            c = sel.concept
            test_rows += [_Row(m, sel.picks[m], best[c][m], "test", i, self.prefixes[i], c) for m in methods if m in SAE_METHODS for i in self.test]
            if "diffmean" in methods:
                test_rows += [_Row("diffmean", -1, best[c]["diffmean"], "test", i, self.prefixes[i], c) for i in self.test]
            if "prompt" in methods:
                test_rows += [_Row("prompt", -1, 0.0, "test", i, PROMPT_TEMPLATE.format(concept=c, prefix=self.prefixes[i]), c) for i in self.test]
        # LoRA: each concept's adapter is trained alone; its rows then decode in the same call as the other test
        # rows, with the adapter applied to those rows only.
        loras: dict[str, LoraReport] = {}
        for sel, methods in items:
            if "lora" not in methods:
                continue
            c = sel.concept
            entry = self._texts_for(c)
            t0 = time.perf_counter()
            with lora_adapter(self.lm, self.sae.layer, entry["texts"], p.lora, seed=p.seed) as report:
                loras[c] = report
            timing["lora_seconds"] += time.perf_counter() - t0
            info[c]["lora"].update(n_corpus_texts=entry["n_corpus"], n_generated_texts=entry["n_generated"], lora_losses=report.losses, lora_params=report.n_params)
            test_rows += [_Row("lora", -1, 1.0, "test", i, self.prefixes[i], c) for i in self.test]
        test_texts = gen(test_rows, feats=feats, vectors=vectors, loras=loras) if test_rows else []
        base = self._unsteered().set_index("prefix_idx")["text"] if any("unsteered" in m for _, m in items) else None
        self._prefetch_nll(test_rows, test_texts)
        tests = by_concept(test_rows, test_texts)

        for sel, methods in items:
            c = sel.concept
            test_frames = [self._score(c, sel.token_ids, *tests[c])] if c in tests else []
            if base is not None and "unsteered" in methods:
                for split, idx in (("train", self.train), ("test", self.test)):
                    rows = [_Row("unsteered", -1, 0.0, split, i, self.prefixes[i], c) for i in idx]
                    (test_frames if split == "test" else frames[c]["unsteered"]).append(self._score(c, sel.token_ids, rows, [base[i] for i in idx]))
            test = self._judge(pd.concat(test_frames, ignore_index=True)) if test_frames else pd.DataFrame()
            for m in methods:
                part = test[test["method"] == m] if not test.empty else test
                rows_m = pd.concat([*frames[c][m], part], ignore_index=True)
                if m in best[c]:
                    info[c][m]["best_strength"] = best[c][m]
                elif not part.empty:
                    info[c][m]["best_strength"] = float(part["strength"].iloc[0])
                self._save_unit(c, m, info[c][m], rows_m)
        timing["concept"] = ", ".join(timing["concepts"])
        timing["seconds"] = time.perf_counter() - t_start
        with open(self.out / "timings.jsonl", "a") as fh:
            fh.write(json.dumps(timing) + "\n")
        return timing

    # -- all concepts ---------------------------------------------------------------------------

    def _run_logged(self, group: Sequence[tuple[Selection, Sequence[str]]]) -> None:
        t = self.run_group(group)
        rate = t["row_steps"] / t["gen_seconds"] if t["gen_seconds"] else float("nan")
        what = "; ".join(f"{sel.concept} ({len(sel.candidates)} candidates): {', '.join(m)}" for sel, m in group)
        self.log(f"{what} done in {t['seconds']:.0f}s ({rate:.0f} decoded tokens/s)")

    def run(self, concepts: Sequence[str], n_concepts: int | None = None) -> None:
        """Evaluate concepts in order until ``n_concepts`` have candidates (skipped ones are recorded too)."""
        methods = [m for m in METHODS if m in self.params.methods]
        # What this run is to cover, so that a reader of a partial run can tell how far it got.
        self.meta["run"] = {"concepts": list(concepts), "n_concepts": n_concepts, "methods": methods}
        self.meta.pop("finished", None)
        _write_json(self.out / "meta.json", self.meta)
        self._unsteered()
        if {"diffmean", "lora"} & set(methods):
            self._concept_texts(concepts)  # one corpus pass for every concept
        evaluated = 0
        group: list[tuple[Selection, list[str]]] = []
        for concept in concepts:
            if n_concepts is not None and evaluated >= n_concepts:
                break
            ids = concept_token_ids(self.lm.tokenizer, concept)
            sel = select_features(concept, ids, self.scores, self.params.top_k, self.params.seed)
            if not sel.candidates:
                reason = sel.skipped["sae_output"] if ids else "the concept is not a single token of this tokenizer"
                for m in methods:
                    if not self.done(concept, m):
                        self._save_unit(concept, m, {"status": "skipped", "reason": reason, "n_candidates": 0, "concept_token_ids": ids}, None)
                self.log(f"{concept}: skipped ({reason})")
                continue
            evaluated += 1
            for m, reason in sel.skipped.items():
                if m in methods and not self.done(concept, m):
                    self._save_unit(concept, m, {"status": "skipped", "reason": reason, "n_candidates": len(sel.candidates), "concept_token_ids": ids}, None)
            pending = [m for m in methods if not self.done(concept, m)]
            if not pending:
                self.log(f"{concept}: already done")
                continue
            group.append((sel, pending))
            if len(group) == self.params.concepts_per_batch:
                self._run_logged(group)
                group = []
        if group:
            self._run_logged(group)
        self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_json(self.out / "meta.json", self.meta)


def run_evaluation(
    lm: LoadedModel,
    sae: LoadedSae,
    scores: FeatureScores,
    concepts: Sequence[str],
    out: str | Path,
    params: EvalParams = EvalParams(),
    prefixes: Sequence[str] | None = None,
    n_concepts: int | None = None,
    resume: bool = False,
    docs: Iterable[Doc] | None = None,
    judge: Judge | None = None,
    log: Log | None = None,
) -> EvalResults:
    """Run (or resume) the evaluation, write the tables and plots under ``out``, and return the results.

    ``docs`` is the corpus concept sentences are mined from (default: the bundled train split); ``judge`` an
    optional ``judge.Judge`` applied to the reported (test-half) generations.
    """
    ev = Evaluation(lm, sae, scores, prefixes if prefixes is not None else default_prefixes(), out, params, resume, docs, judge, log)
    ev.run(concepts, n_concepts)
    results = load_results(out)
    write_report(results, out)
    return results


# ---------------------------------------------------------------------------------------------------
# Results: loading, tables, figures


METRICS = ("concept_score", "mentions", "success_k", "fluency", "ppl", "repetition", "combined")


@dataclass
class EvalResults:
    """An evaluation run read back from disk (finished or partial)."""

    generations: pd.DataFrame  # one row per generation (see the module docstring for the columns)
    units: pd.DataFrame  # one row per (concept, method): status, reason, feature, best_strength, ...
    meta: dict
    timings: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Per (concept, method) on the test half, with the unit's number of candidate features."""
        out = summarize(self.generations)
        if len(self.units) and "n_candidates" in self.units.columns:
            out = out.merge(self.units[["concept", "method", "n_candidates"]], on=["concept", "method"], how="left")
        return out

    def methods(self, min_candidates: int = 1) -> pd.DataFrame:
        return method_table(self.summary(), min_candidates)


def default_out_dir(model_name: str, sae_id: str) -> Path:
    """Where ``eval`` writes by default: ``$SAESTEER_CACHE/eval/<model>/<sae id>``."""
    def safe(name: str) -> str:
        return name.replace("/", "__").replace(":", "_")

    return eval_cache() / safe(model_name) / safe(sae_id)


def eval_roots() -> list[Path]:
    """Where :func:`list_runs` looks by default: the cache's ``eval/`` (where ``eval`` writes unless given
    ``--out``) and the results shipped under ``assets/eval/results/`` (``paths.EVAL_RESULTS``)."""
    return [eval_cache(), paths.EVAL_RESULTS]


def list_runs(roots: Sequence[str | Path] | None = None) -> list[Path]:
    """Evaluation directories (holding meta.json and units/, or a packed run's units.parquet) under ``roots``
    (default :func:`eval_roots`), at any depth; sorted by path, numbers in natural order (L2 before L11)."""
    roots = eval_roots() if roots is None else [Path(r) for r in roots]
    found = {p.parent for r in roots if Path(r).exists() for p in Path(r).rglob("meta.json")
             if (p.parent / "units").is_dir() or (p.parent / PACKED_UNITS).is_file()}
    # natural order: L2 before L11
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def load_results(out: str | Path) -> EvalResults:
    """Read an evaluation directory written by :func:`run_evaluation` (also while it is still running)."""
    out = Path(out)
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{out} holds no evaluation (no meta.json): run `python -m saesteer eval` first")
    meta = json.loads(meta_path.read_text())
    if not (out / "units").is_dir() and (out / PACKED_UNITS).is_file():
        units = pd.read_parquet(out / PACKED_UNITS)
        gens = pd.read_parquet(out / "generations.parquet")
        tpath = out / "timings.jsonl"
        timings = pd.read_json(tpath, lines=True) if tpath.exists() and tpath.stat().st_size else pd.DataFrame()
        return EvalResults(gens, units, meta, timings)
    unit_rows, frames = [], []
    for j in sorted((out / "units").glob("*.json")):
        unit_rows.append(json.loads(j.read_text()))
        pq = j.with_suffix(".parquet")
        if pq.exists():
            frames.append(pd.read_parquet(pq))
    gens = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["concept", "method", "feature", "strength", "split", "prefix_idx", "text", *METRICS])
    units = pd.DataFrame(unit_rows) if unit_rows else pd.DataFrame(columns=["concept", "method", "status", "reason"])
    tpath = out / "timings.jsonl"
    timings = pd.read_json(tpath, lines=True) if tpath.exists() and tpath.stat().st_size else pd.DataFrame()
    return EvalResults(gens, units, meta, timings)


#: A packed run (:func:`pack_results`) keeps its unit records in one file instead of ``units/``.
PACKED_UNITS = "units.parquet"


def pack_results(src: str | Path, dest: str | Path) -> Path:
    """Copy the finished run in ``src`` to ``dest`` in packed form: meta.json, the unit records as one
    ``units.parquet``, generations.parquet, timings.jsonl and the CSV tables (no per-unit files, no HTML
    report with inlined plotly). :func:`load_results` reads it like the original; it cannot be resumed."""
    src, dest = Path(src), Path(dest)
    results = load_results(src)
    if not len(results.units):
        raise ConfigError(f"{src} holds no finished units to pack")
    dest.mkdir(parents=True, exist_ok=True)
    meta = {**results.meta, "packed_from": str(src)}
    _write_json(dest / "meta.json", meta)
    units = results.units.copy()
    for col in units.columns:  # parquet needs one type per column: lists and scalars mixed with None are fine
        if units[col].map(lambda v: isinstance(v, (dict, tuple))).any():
            units[col] = units[col].map(lambda v: json.dumps(v, default=_json_default) if isinstance(v, (dict, tuple)) else v)
    _write_parquet(dest / PACKED_UNITS, units)
    _write_parquet(dest / "generations.parquet", results.generations)
    if (src / "timings.jsonl").exists():
        (dest / "timings.jsonl").write_text((src / "timings.jsonl").read_text())
    summary = results.summary()
    summary.to_csv(dest / "summary.csv", index=False)
    method_table(summary).to_csv(dest / "methods.csv", index=False)
    results.units.to_csv(dest / "units.csv", index=False)
    return dest


@dataclass(frozen=True)
class RunProgress:
    """How far an evaluation directory got (see :func:`run_progress`)."""

    finished: bool
    """The run ended normally (an interrupted or still running one has not)."""
    n_done: int
    """Concepts with a result for every method of the run."""
    n_partial: int
    """Concepts with results for some methods only (the run stopped inside them)."""
    n_skipped: int
    """Concepts every method skipped (no candidate features)."""
    target: int | None
    """Concepts with candidates the run was asked for (``--n-concepts``); None when the run did not record it."""
    methods: tuple[str, ...]


def run_progress(results: EvalResults, out: str | Path) -> RunProgress:
    """Progress of the run in ``out``. Runs record their goal and a ``finished`` stamp in meta.json; for
    runs written before that, the report files (written after the last concept) mark a finished run."""
    meta = results.meta
    goal = meta.get("run") or {}
    methods = tuple(goal.get("methods") or (meta.get("params") or {}).get("methods") or METHODS)
    n_done = n_partial = n_skipped = 0
    units = results.units
    if len(units):
        for _, part in units.groupby("concept", sort=False):
            status = set(part["status"])
            if status == {"skipped"}:
                n_skipped += 1
            elif set(methods) <= set(part["method"]):
                n_done += 1
            else:
                n_partial += 1
    stamped = meta.get("finished") is not None if "run" in meta else (Path(out) / "methods.csv").exists()
    return RunProgress(stamped and n_partial == 0, n_done, n_partial, n_skipped, goal.get("n_concepts"), methods)


def summarize(generations: pd.DataFrame) -> pd.DataFrame:
    """Per (concept, method): means over the test-half generations at the chosen strength (ppl: median)."""
    test = generations[generations["split"] == "test"]
    if test.empty:
        return pd.DataFrame(columns=["concept", "method", "feature", "strength", "n", *METRICS])
    metrics = [m for m in (*METRICS, "judge_score") if m in test.columns]
    agg = {m: ("median" if m == "ppl" else "mean") for m in metrics}
    g = test.groupby(["concept", "method"], sort=False)
    out = g.agg(agg)
    out.insert(0, "n", g.size())
    out.insert(0, "strength", g["strength"].first())
    out.insert(0, "feature", g["feature"].first())
    return out.reset_index()


def method_table(summary: pd.DataFrame, min_candidates: int = 1) -> pd.DataFrame:
    """Per method: mean and standard error over concepts of each metric, on the concepts that every listed
    method completed (so all methods are compared on the same concepts). ``min_candidates`` > 1 keeps only
    concepts with at least that many candidate features: with one candidate, all SAE methods steer with
    the same feature."""
    if "n_candidates" in summary.columns and min_candidates > 1:
        keep = summary.groupby("concept")["n_candidates"].max()
        summary = summary[summary["concept"].isin(keep[keep >= min_candidates].index)]
    if summary.empty:
        return pd.DataFrame(columns=["method", "n_concepts"])
    methods = [m for m in METHODS if m in set(summary["method"])]
    per = summary.groupby("concept")["method"].apply(set)
    common = [c for c, ms in per.items() if set(methods) <= ms]
    rows = []
    for m in methods:
        part = summary[(summary["method"] == m) & summary["concept"].isin(common)]
        row = {"method": m, "n_concepts": len(part)}
        for metric in [x for x in (*METRICS, "judge_score") if x in part.columns]:
            vals = part[metric].astype(float)
            row[metric] = vals.mean()
            row[f"{metric}_sem"] = vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def strength_curves(generations: pd.DataFrame, methods: Sequence[str] = SAE_METHODS) -> pd.DataFrame:
    """Train-half means per (method, strength) over all concepts: the curves strengths are chosen from."""
    train = generations[(generations["split"] == "train") & generations["method"].isin(methods)]
    if train.empty:
        return pd.DataFrame(columns=["method", "strength", "concept_score", "fluency", "combined"])
    return train.groupby(["method", "strength"])[["concept_score", "fluency", "combined", "success_k"]].mean().reset_index()


_COLORS = {
    "sae_output": "#d62728", "sae_input": "#1f77b4", "sae_random": "#7f7f7f", "diffmean": "#2ca02c",
    "lora": "#9467bd", "prompt": "#ff7f0e", "unsteered": "#000000",
}


def fig_methods(table: pd.DataFrame):
    """Grouped bars: mean concept score, fluency and combined score per method (± standard error)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for metric, name in (("concept_score", "concept"), ("fluency", "fluency"), ("combined", "combined")):
        if metric not in table.columns:
            continue
        fig.add_trace(go.Bar(
            x=list(table["method"]), y=table[metric], name=name,
            error_y=dict(type="data", array=table.get(f"{metric}_sem", pd.Series(np.nan, index=table.index)).fillna(0)),
        ))
    n = int(table["n_concepts"].max()) if len(table) else 0
    fig.update_layout(barmode="group", height=380, yaxis=dict(range=[0, 1.05], title="mean over concepts (test half)"),
                      title=f"Steering methods on {n} concepts", margin=dict(l=50, r=20, t=50, b=40))
    return fig


def fig_strength_curves(curves: pd.DataFrame):
    """Concept score and combined score against strength (train half, mean over concepts), one line per method.
    (Fluency is left out: on the train half it is only computed for rows that mention the concept.)"""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("concept score", "combined score"))
    for m, part in curves.groupby("method", sort=False):
        part = part.sort_values("strength")
        for col, metric in ((1, "concept_score"), (2, "combined")):
            fig.add_trace(go.Scatter(x=part["strength"], y=part[metric], mode="lines+markers", name=m, legendgroup=m,
                                     showlegend=col == 1, line_color=_COLORS.get(m)), row=1, col=col)
    positive = bool(len(curves)) and bool((curves["strength"] > 0).all())
    fig.update_xaxes(title_text="strength", type="log" if positive else "linear")
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(height=360, margin=dict(l=50, r=20, t=40, b=40))
    return fig


def fig_concepts(summary: pd.DataFrame, metric: str = "combined"):
    """Heatmap of ``metric`` per concept (rows) and method (columns) on the test half."""
    import plotly.graph_objects as go

    from .plots import esc

    if summary.empty:
        return go.Figure()
    pivot = summary.pivot_table(index="concept", columns="method", values=metric)
    pivot = pivot[[m for m in METHODS if m in pivot.columns]]
    fig = go.Figure(go.Heatmap(z=pivot.to_numpy(), x=list(pivot.columns), y=[esc(c) for c in pivot.index], zmin=0, zmax=1,
                               colorscale="Viridis", hovertemplate="%{y} · %{x}: %{z:.2f}<extra></extra>"))
    fig.update_layout(height=max(300, 18 * len(pivot) + 80), margin=dict(l=100, r=20, t=30, b=40), title=f"{metric} per concept")
    return fig


def fig_compare(table: pd.DataFrame, metric: str = "combined"):
    """Grouped bars of ``metric`` per method, one bar group per method and one bar per run (``run`` column)."""
    import plotly.graph_objects as go

    from .plots import esc

    fig = go.Figure()
    for run, part in table.groupby("run", sort=False):
        part = part.set_index("method").reindex([m for m in METHODS if m in set(part["method"])])
        sem = part.get(f"{metric}_sem", pd.Series(np.nan, index=part.index)).fillna(0)
        fig.add_trace(go.Bar(x=list(part.index), y=part[metric], name=esc(run), error_y=dict(type="data", array=sem)))
    fig.update_layout(barmode="group", height=380, yaxis=dict(title=f"{metric} (test half, mean over concepts)", rangemode="tozero"),
                      margin=dict(l=50, r=20, t=30, b=40), legend_title_text="run")
    return fig


def figures(results: EvalResults) -> dict:
    """All report figures by name."""
    gens = results.generations
    return {
        "methods": fig_methods(results.methods()),
        "strength_sae": fig_strength_curves(strength_curves(gens, SAE_METHODS)),
        "strength_diffmean": fig_strength_curves(strength_curves(gens, ("diffmean",))),
        "concepts": fig_concepts(results.summary()),
    }


def write_report(results: EvalResults, out: str | Path) -> None:
    """Tables (parquet + CSV), figures (plotly JSON) and one self-contained HTML report under ``out``."""
    out = Path(out)
    summary = results.summary()
    table = method_table(summary)
    _write_parquet(out / "generations.parquet", results.generations)
    results.generations.to_csv(out / "generations.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    table.to_csv(out / "methods.csv", index=False)
    results.units.to_csv(out / "units.csv", index=False)
    figs = figures(results)
    (out / "figures").mkdir(exist_ok=True)
    parts = []
    for i, (name, fig) in enumerate(figs.items()):
        (out / "figures" / f"{name}.json").write_text(fig.to_json())
        # plotly.js is inlined once so that the report opens offline.
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    head = f"<h1>Steering evaluation: {html.escape(str(results.meta.get('sae_id')))} ({html.escape(str(results.meta.get('model')))})</h1>"
    (out / "report.html").write_text("<html><head><meta charset='utf-8'></head><body>" + head + table.to_html(index=False, float_format="%.3f") + "".join(parts) + "</body></html>")
