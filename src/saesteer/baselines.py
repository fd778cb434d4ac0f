"""Supervised steering baselines for the evaluation: concept texts, DiffMean vectors and LoRA adapters.

Concept texts come offline. :func:`mine_sentences` makes one pass over a corpus (by default the bundled
one, ``corpus.iter_bundled("train")``), splits documents into sentences (on ``.``, ``!``, ``?`` and ``;``
followed by white space, and on line breaks), keeps sentences of 30–300 characters, and reservoir-samples
(seeded) up to ``n`` per concept among those that mention it (same word match as the evaluation's
concept score, see :func:`mention_pattern`), plus a pool of *neutral* sentences that mention none of the
concepts. When the corpus holds fewer than ``min_texts`` sentences for a concept, :func:`generated_texts`
tops them up with the model's own sampled continuations of ``"Talk about {concept}. {prefix}"`` (the
instruction dropped, prefix kept); the provenance counts are recorded with every result.

DiffMean (AxBench): mean residual stream at the SAE layer over the tokens of the concept sentences minus
the mean over the neutral sentences (BOS and padding excluded). It is steered additively at every position
as ``coeff · r · v/‖v‖`` with r the mean residual norm of the neutral tokens, so that coefficients are
relative to the typical size of the residual stream. The edit goes through ``steering.residual_edit``.

LoRA: a rank-``r`` adapter (peft) on every linear map of the SAE layer's block, trained for a few AdamW
steps with the language-modelling loss on the concept sentences, active only inside :func:`lora_adapter`
and removed (``unload``) on exit, so the shared model is left exactly as it was.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .config import ConfigError
from .corpus import Doc
from .models import LoadedModel
from .steering import capture_residuals, output_edits, residual_edit, run_until_stop

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")
_WORD = re.compile(r"\w+")


def mention_pattern(concept: str) -> re.Pattern:
    """Case-insensitive whole-word match of ``concept`` with an optional plural ``s``/``es``; the words of a
    phrase may be separated by any white space."""
    words = [re.escape(w) for w in concept.strip().split()]
    if not words:
        raise ConfigError("a concept is empty: give a word or a short phrase")
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?:e?s)?(?!\w)", re.IGNORECASE)


def split_sentences(text: str, min_chars: int = 30, max_chars: int = 300) -> Iterator[str]:
    for s in _SENTENCE_SPLIT.split(text):
        s = s.strip()
        if min_chars <= len(s) <= max_chars:
            yield s


@dataclass
class MinedTexts:
    """Corpus sentences per concept, and neutral sentences that mention none of the concepts."""

    positive: dict[str, list[str]]
    neutral: list[str]
    n_sentences: int  # sentences looked at


def _word_index(concepts: Sequence[str]) -> dict[str, list[tuple[str, list[str]]]]:
    """First word (lower-case; every plural form for one-word concepts) -> [(concept, its other words)]."""
    index: dict[str, list[tuple[str, list[str]]]] = {}
    for c in concepts:
        words = c.lower().split()
        firsts = [words[0], words[0] + "s", words[0] + "es"] if len(words) == 1 else [words[0]]
        for w in firsts:
            index.setdefault(w, []).append((c, words[1:]))
    return index


def _candidates(words: list[str], index: dict[str, list[tuple[str, list[str]]]]) -> set[str]:
    """Concepts whose words occur in a row in ``words``: a superset of the mention_pattern matches."""
    found = set()
    for i, w in enumerate(words):
        for concept, rest in index.get(w, ()):
            if not rest:
                found.add(concept)
                continue
            nxt = words[i + 1 : i + 1 + len(rest)]
            last = rest[-1]
            if len(nxt) == len(rest) and nxt[:-1] == rest[:-1] and nxt[-1] in (last, last + "s", last + "es"):
                found.add(concept)
    return found


def mine_sentences(concepts: Sequence[str], docs: Iterable[Doc], n: int = 32, n_neutral: int = 128, seed: int = 0) -> MinedTexts:
    """One pass over ``docs``: a seeded reservoir sample of up to ``n`` sentences per concept and ``n_neutral``
    neutral ones (see the module docstring for the sentence rules)."""
    patterns = {c: mention_pattern(c) for c in concepts}
    # A word-set lookup finds the few sentences that may mention a concept; the regex then decides.
    index = _word_index(concepts)
    rng = random.Random(seed)
    pos: dict[str, list[str]] = {c: [] for c in concepts}
    seen: dict[str, int] = {c: 0 for c in concepts}
    neutral: list[str] = []
    n_neu = 0
    total = 0

    def offer(pool: list[str], count: int, cap: int, item: str) -> None:
        if len(pool) < cap:
            pool.append(item)
        else:
            j = rng.randrange(count)
            if j < cap:
                pool[j] = item

    for doc in docs:
        for sent in split_sentences(doc.text):
            total += 1
            maybe = _candidates(_WORD.findall(sent.lower()), index)
            hits = [c for c in concepts if c in maybe and patterns[c].search(sent)]
            if not hits:
                n_neu += 1
                offer(neutral, n_neu, n_neutral, sent)
            for c in hits:
                seen[c] += 1
                offer(pos[c], seen[c], n, sent)
    return MinedTexts(pos, neutral, total)


def generated_texts(lm: LoadedModel, concept: str, prefixes: Sequence[str], n: int, seed: int = 0, max_new_tokens: int = 32) -> list[str]:
    """``n`` sampled continuations of ``"Talk about {concept}. {prefix}"`` (prefixes reused in turn), returned as
    ``prefix + continuation`` without the instruction: the model's own text about the concept."""
    from .steering import generate

    if not prefixes:
        raise ConfigError("generating concept texts needs at least one prefix")
    chosen = [prefixes[i % len(prefixes)] for i in range(n)]
    prompts = [f"Talk about {concept}. {p}" for p in chosen]
    outs = generate(lm, prompts, max_new_tokens=max_new_tokens, temperature=0.8, seed=seed)
    return [_join(p, c) for p, c in zip(chosen, outs)]


def _join(prefix: str, continuation: str) -> str:
    if not continuation or continuation[0].isspace() or prefix[-1:].isspace():
        return prefix + continuation
    return f"{prefix} {continuation}"


# ---------------------------------------------------------------------------------------------------
# DiffMean


@dataclass
class ResidualMean:
    """Sum and count of residual vectors at one layer (BOS and padding excluded), and the sum of their norms."""

    total: torch.Tensor  # (d_model,) float64
    norm_total: float
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_norm(self) -> float:
        return self.norm_total / max(self.count, 1)


def _batch_ids(lm: LoadedModel, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (batch, pos) with one leading BOS, the attention mask, and a mask of the text tokens
    (BOS and padding excluded)."""
    tok = lm.tokenizer
    bos = tok.bos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = []
    for t in texts:
        ids = list(tok(t, add_special_tokens=False).input_ids)[: max_tokens - (bos is not None)]
        rows.append(([bos] if bos is not None else []) + ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    content = mask.bool().clone()
    if bos is not None:
        content[:, 0] = False
    return ids.to(lm.device), mask.to(lm.device), content.to(lm.device)


@torch.no_grad()
def residual_mean(lm: LoadedModel, layer: int, texts: Sequence[str], batch_size: int = 16, max_tokens: int = 64) -> ResidualMean:
    """Mean of the residual stream after block ``layer`` over the tokens of ``texts`` (BOS and padding excluded)."""
    total = torch.zeros(lm.d_model, dtype=torch.float64)
    norm_total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids, mask, content = _batch_ids(lm, texts[start : start + batch_size], max_tokens)
        forward = partial(lm.model.get_decoder(), input_ids=ids, attention_mask=mask, use_cache=False)
        with lm.lock, capture_residuals(lm, [layer], stop=True) as store:
            run_until_stop(forward)
        x = store[layer][content].double().cpu()  # (tokens, d_model)
        total += x.sum(0)
        norm_total += float(x.norm(dim=-1).sum())
        count += int(x.shape[0])
    return ResidualMean(total, norm_total, count)


@dataclass
class DiffMean:
    """A DiffMean steering vector: ``unit`` (d_model,) float32 and the residual norm that coefficients scale."""

    unit: torch.Tensor
    raw_norm: float  # ‖mean(concept) − mean(neutral)‖
    resid_norm: float  # mean ‖x‖ of the neutral tokens
    n_concept_tokens: int
    n_neutral_tokens: int

    def vector(self, coeff: float = 1.0) -> torch.Tensor:
        return self.unit * (coeff * self.resid_norm)


def diffmean(concept: ResidualMean, neutral: ResidualMean) -> DiffMean:
    if concept.count == 0 or neutral.count == 0:
        raise ConfigError("DiffMean needs tokens from both concept and neutral texts")
    diff = (concept.mean - neutral.mean).float()
    norm = float(diff.norm())
    if not math.isfinite(norm) or norm == 0:
        raise ConfigError("the concept and neutral mean residuals are identical: DiffMean has no direction")
    return DiffMean(diff / norm, norm, neutral.mean_norm, concept.count, neutral.count)


@contextmanager
def add_vector(lm: LoadedModel, layer: int, vector: torch.Tensor, coeffs: torch.Tensor) -> Iterator[None]:
    """Add ``coeffs[b] · vector`` (or ``coeffs[b] · vector[b]`` for per-row vectors (batch, d_model)) to every
    position of row b of the residual stream after block ``layer`` (additive steering with a free vector);
    holds ``lm.lock``. The batch of every forward must have ``len(coeffs)`` rows, as ``steering.generate``
    keeps its prompts in order in one batch."""
    vec = vector.to(lm.device, lm.dtype)  # (d_model,) or (batch, d_model)
    c = torch.as_tensor(coeffs, dtype=lm.dtype, device=lm.device).reshape(-1)  # (batch,)
    if vec.dim() == 2 and vec.shape[0] != c.shape[0]:
        raise ConfigError(f"{vec.shape[0]} per-row vectors but {c.shape[0]} per-row coefficients")
    v = vec[:, None, :] if vec.dim() == 2 else vec

    def fn(x: torch.Tensor) -> torch.Tensor:  # (batch, pos, d_model)
        if x.shape[0] != c.shape[0]:
            raise ConfigError(f"{c.shape[0]} per-row coefficients but the forward has batch {x.shape[0]}")
        return x + c[:, None, None] * v

    with lm.lock, residual_edit(lm.layers[layer], fn):
        yield


# ---------------------------------------------------------------------------------------------------
# LoRA


@dataclass(frozen=True)
class LoraParams:
    """A tiny LoRA adapter trained for a few steps on concept sentences."""

    rank: int = 4
    """Rank r of every adapter."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r) · B A."""
    steps: int = 6
    """AdamW steps (each costs a forward and backward through the layers above the adapter and the
    unembedding: the baseline is kept cheap, far from AxBench's fully trained LoRA)."""
    lr: float = 1e-2
    """Learning rate."""
    batch_size: int = 4
    """Sentences per step (drawn in turn from a seeded shuffle)."""
    max_tokens: int = 32
    """Sentences are cut to this many tokens."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.max_tokens < 2:
            raise ConfigError("LoRA needs rank >= 1, steps >= 1, batch_size >= 1 and max_tokens >= 2")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the LoRA learning rate must be positive, got {self.lr!r}")


@dataclass
class LoraReport:
    losses: list[float]  # training loss per step
    n_params: int  # trainable parameters
    targets: list[str]  # adapted module names
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    """The trained adapter, module name -> (A (r, in), B (out, r), scaling): what :func:`lora_rows` applies."""


def _linear_names(lm: LoadedModel, layer: int) -> list[str]:
    block = lm.layers[layer]
    names = {id(m): n for n, m in lm.model.named_modules()}
    return [names[id(m)] for m in block.modules() if isinstance(m, nn.Linear)]


@contextmanager
def lora_adapter(lm: LoadedModel, layer: int, texts: Sequence[str], params: LoraParams = LoraParams(), seed: int = 0) -> Iterator[LoraReport]:
    """Train a LoRA adapter on ``texts`` and keep it active inside the block; holds ``lm.lock``.

    On exit the adapter is unloaded and ``lm.model`` holds its original modules again (the base weights are
    never changed: only the adapter's A and B are trained).
    """
    from peft import LoraConfig, get_peft_model

    if not texts:
        raise ConfigError("LoRA needs at least one concept text")
    targets = _linear_names(lm, layer)
    cfg = LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    order = list(texts)
    random.Random(seed).shuffle(order)
    with lm.lock:
        was_training = lm.model.training
        torch.manual_seed(seed)
        peft_model = get_peft_model(lm.model, cfg)
        try:
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0)
            losses = []
            with torch.enable_grad():
                for step in range(params.steps):
                    batch = [order[(step * params.batch_size + i) % len(order)] for i in range(params.batch_size)]
                    ids, mask, content = _batch_ids(lm, batch, params.max_tokens)
                    labels = ids.masked_fill(~content, -100)
                    loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
            lm.model.eval()
            weights = {}
            for name, mod in lm.model.named_modules():
                if name in targets and hasattr(mod, "lora_A"):
                    weights[name] = (mod.lora_A["default"].weight.detach().clone(), mod.lora_B["default"].weight.detach().clone(), float(mod.scaling["default"]))
            with torch.no_grad():
                yield LoraReport(losses, sum(p.numel() for p in trainable), targets, weights)
        finally:
            peft_model.unload()
            lm.model.train(was_training)
            lm.model.requires_grad_(False)


@contextmanager
def lora_rows(lm: LoadedModel, adapters: Sequence[tuple[LoraReport, Sequence[int]]]) -> Iterator[None]:
    """Apply trained LoRA adapters (:class:`LoraReport` of :func:`lora_adapter`) each to its own rows of every
    forward, so that one batch decodes rows of several adapters and unadapted rows together; holds ``lm.lock``.

    Row b of adapter (A, B, s) on a linear layer with output y and input x gets ``y_b + B(A(x_b)) · s``, the
    same operations in the same order as peft's LoRA layer: tested to decode the same text as the peft model.
    """
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, int]]] = {}
    for report, rows in adapters:
        rows = [int(r) for r in rows]
        if not rows:
            continue
        idx = torch.tensor(rows, dtype=torch.long, device=lm.device)
        for name, (a, b, scale) in report.weights.items():
            per_module.setdefault(name, []).append((a.to(lm.device), b.to(lm.device), scale, idx, max(rows)))

    def make(items):
        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for a, b, scale, idx, top in items:
                if top >= y.shape[0]:
                    raise ConfigError(f"LoRA rows up to {top} but the forward has batch {y.shape[0]}")
                xa = x.index_select(0, idx).to(a.dtype)
                y = y.index_add(0, idx, (torch.nn.functional.linear(torch.nn.functional.linear(xa, a), b) * scale).to(y.dtype))
            return y

        return fn

    with lm.lock, output_edits([(lm.model.get_submodule(name), make(items)) for name, items in per_module.items()]):
        yield
