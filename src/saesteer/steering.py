"""The only code that touches the residual stream: forward hooks installed by context managers.

Every hook is removed in ``finally``; nothing stays attached to a (shared) model after a ``with`` block.
"""

from __future__ import annotations

import copy
import numbers
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from . import fasthead
from .config import MAX_ABS_STRENGTH, ConfigError, SteerMode, SteerParams
from .hookpoints import resolve_module
from .models import LoadedModel
from .saes import LoadedSae

ResidFn = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early once the last needed layer has run."""


def _unpack(output):
    return output[0] if isinstance(output, tuple) else output


def _repack(output, resid: torch.Tensor):
    return (resid, *output[1:]) if isinstance(output, tuple) else resid


@contextmanager
def residual_edit(module: nn.Module, fn: ResidFn) -> Iterator[None]:
    """Replace ``module``'s residual output x (batch, pos, d_model) by ``fn(x)`` for the duration of the block."""

    def hook(_mod, _inp, output):
        return _repack(output, fn(_unpack(output)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def output_edits(edits: Sequence[tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]) -> Iterator[None]:
    """Replace each module's output y by ``fn(x, y)`` (x its first input) for the duration of the block: the
    hook behind per-row adapters on single layers (``baselines.lora_rows``)."""
    handles = []
    try:
        for module, fn in edits:
            handles.append(module.register_forward_hook(lambda _mod, inp, out, fn=fn: fn(inp[0], out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_residuals(lm: LoadedModel, layers: Sequence[int], stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual stream after each of ``layers`` into the yielded dict (layer -> (batch, pos, d_model)).

    With ``stop=True`` the forward raises :class:`StopForward` after the deepest layer; wrap the call in
    ``run_until_stop``.
    """
    store: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []

    def make(layer: int):
        def hook(_mod, _inp, output):
            store[layer] = _unpack(output).detach()
            if stop and layer == last:
                raise StopForward

        return hook

    try:
        for layer in layers:
            handles.append(lm.layers[layer].register_forward_hook(make(layer)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until_stop(fn: Callable[[], object]) -> None:
    try:
        fn()
    except StopForward:
        pass


# --------------------------------------------------------------------------------------------------
# Steering
#
# Thread safety: a LoadedModel is shared by every Streamlit session (st.cache_resource). A forward hook
# is global to the model, so a hook installed by one thread would steer another thread's forward.
# Everything below therefore holds ``lm.lock`` (an RLock) for the whole of a steered *or* baseline
# forward/generation: ``steer`` takes it while its hook is attached, and ``generate``/``stream`` take it
# around the entire decode loop. Any other code that runs a forward on a shared model must hold it too.
# --------------------------------------------------------------------------------------------------

Strengths = Sequence[float] | torch.Tensor


def strength_tensor(strengths: Strengths, n_features: int, batch: int | None = None) -> torch.Tensor:
    """Validated float32 strengths: shape (n_features,) for every row, or (batch, n_features) per row."""
    s = torch.as_tensor(strengths, dtype=torch.float32).detach().cpu()
    if s.ndim == 0 or s.shape[-1] != n_features or s.ndim > 2:
        raise ConfigError(
            f"strengths of shape {tuple(s.shape)} do not fit {n_features} feature(s): give one strength per feature, "
            "or a (batch, n_features) tensor"
        )
    if s.ndim == 2 and batch is not None and s.shape[0] != batch:
        raise ConfigError(f"per-row strengths have {s.shape[0]} rows but the batch has {batch} prompts")
    if not torch.isfinite(s).all():
        raise ConfigError("strengths must be finite numbers (no NaN or inf)")
    if s.numel() and s.abs().max() > MAX_ABS_STRENGTH:
        raise ConfigError(f"strength {s.abs().max().item():g} is out of range: use |strength| <= {MAX_ABS_STRENGTH:g}")
    return s


class LiveRows:
    """Per-row strengths (rows, n_features) of a batch whose finished rows leave it: the steering hook reads
    the rows still in the batch (``alive``, set by the decode loop) at every forward."""

    def __init__(self, strengths: torch.Tensor, n_features: int):
        self.strengths = strength_tensor(strengths, n_features)
        if self.strengths.ndim != 2:
            raise ConfigError("LiveRows needs a (rows, n_features) tensor of strengths")
        self.alive = torch.arange(self.strengths.shape[0])

    def current(self, batch: int) -> torch.Tensor:
        if len(self.alive) != batch:
            raise ConfigError(f"{len(self.alive)} rows are alive but the forward has batch {batch}")
        return self.strengths[self.alive]


def steering_fn(sae: LoadedSae, features: Sequence[int], strengths: Strengths, mode: SteerMode = "paper") -> ResidFn:
    """The residual edit of one steering configuration, as a pure function x -> x'.

    paper:    x'[:, -1] = x[:, -1] + Σ_i s_i · max_j a_j(x[:, -1]) · d_{f_i}   (a = sae.encode, other positions kept)
    additive: x'        = x + Σ_i s_i · d_{f_i}                                (every position)
    where d_f = ``sae.directions([f])`` (= W_dec[f] for a plain SAE). ``strengths`` is (n,) or (batch, n).
    In paper mode this equals ``decode(a + c·e_f) + (x − decode(a))`` because the decoder is affine. The
    directions are taken once, so SAEs whose decode rescales by statistics of the current input (sae-lens
    ``normalize_activations`` 'layer_norm' / 'constant_norm_rescale') are steered with the directions of
    the state the SAE was in when the context opened.
    """
    for f in features:
        sae.check_feature(f)
    if mode not in ("paper", "additive"):
        raise ConfigError(f"mode {mode!r} is unknown: use 'paper' or 'additive'")
    live = strengths if isinstance(strengths, LiveRows) else None
    s = live.strengths if live is not None else strength_tensor(strengths, len(features))
    dirs = sae.directions(list(features)).float()  # (n, d_model)
    sae_dtype = sae.sae.W_dec.dtype
    sae_device = sae.sae.W_dec.device

    def row_strengths(batch: int, device: torch.device) -> torch.Tensor:  # (batch or 1, n)
        if live is not None:
            return live.current(batch).to(device)
        if s.ndim == 2 and s.shape[0] != batch:
            raise ConfigError(f"per-row strengths have {s.shape[0]} rows but the forward has batch {batch}")
        return (s if s.ndim == 2 else s[None]).to(device)

    def paper(x: torch.Tensor) -> torch.Tensor:  # (batch, pos, d_model)
        last = x[:, -1]
        with torch.no_grad():
            acts = sae.sae.encode(last.to(device=sae_device, dtype=sae_dtype))  # (batch, d_sae)
            peak = acts.float().max(dim=-1).values.to(x.device)  # (batch,)
            coef = row_strengths(x.shape[0], x.device) * peak[:, None]  # (batch, n)
            delta = coef @ dirs.to(x.device)  # (batch, d_model)
        out = x.clone()
        out[:, -1] = last + delta.to(x.dtype)
        return out

    def additive(x: torch.Tensor) -> torch.Tensor:
        delta = row_strengths(x.shape[0], x.device) @ dirs.to(x.device)  # (batch or 1, d_model)
        return x + delta[:, None, :].to(x.dtype)

    return paper if mode == "paper" else additive


@contextmanager
def steer(
    lm: LoadedModel,
    sae: LoadedSae,
    features: Sequence[int],
    strengths: Strengths,
    mode: SteerMode = "paper",
    *,
    model: nn.Module | None = None,
) -> Iterator[None]:
    """Steer every forward of ``lm`` inside the block (see :func:`steering_fn`); holds ``lm.lock`` throughout.

    ``model``: the module tree whose layer gets the hook, ``lm.model`` by default; ``fast_model(lm)`` to
    steer the bf16 fast-decode copy (the edit is computed in float32 and cast to the residual's dtype).
    With no features the block runs unsteered (still under the lock). The hook is removed on exit, also
    when the block raises.
    """
    fn = steering_fn(sae, features, strengths, mode) if len(features) else None
    module = resolve_module(lm, sae.hook_name, model)
    with lm.lock:
        if fn is None:
            yield
        else:
            with residual_edit(module, fn):
                yield


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------

FAST_DTYPE = torch.bfloat16
FAST_MAX_BATCH = 12
"""``fast=True`` decodes batches of up to this many rows on the bf16 copy: one live stream, the lab's
baseline/steered pair, the concept duel's three columns and its strength strip. Larger batches (the
evaluation's hundreds of rows) keep the float32 model, whose results the evaluation reports. On this 2-core
CPU the copy decoded 2.9-4.4x faster than float32 at every batch from 3 to 12 rows, measured in one run
(``benchmarks/fast_batch.py``; figures in ``benchmarks/results/fast_batch.md``)."""

_FAST_MODELS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
_FAST_MODELS_LOCK = threading.Lock()


def _cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``model`` with its floating-point parameters in ``dtype``, never holding a second
    float32 copy. Tied weights are one Parameter, so they stay tied; buffers (rotary frequencies, embedding
    scale) are copied as they are, which keeps the rotary angles in float32."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        data = p.detach().to(dtype) if p.is_floating_point() else p.detach().clone()
        memo[id(p)] = nn.Parameter(data, requires_grad=False)
    return copy.deepcopy(model, memo)


def _is_fast_dtype(model: nn.Module) -> bool:
    return all(p.dtype == FAST_DTYPE for p in model.parameters() if p.is_floating_point())


def fast_model(lm: LoadedModel) -> nn.Module:
    """The fast-decode model: a bfloat16 copy of the whole of ``lm.model``, made once per model and cached.

    Single-stream CPU decoding is bound by reading the weights (the 262144 × 640 unembedding of Gemma 3 270M
    above all); bf16 halves the bytes read. The price: **memory**, two bytes per parameter held for as long
    as the model lives (about 0.54 GB extra for the embedded Gemma 3 270M; the cache is keyed weakly by
    ``lm.model``), and **precision**: greedy text follows float32 for the first few tokens, then may take
    another (still fluent) path, so compare fast runs only with fast runs. A model whose parameters are
    already bf16 is its own fast copy. Greedy decoding on the copy (on a CPU) takes the next token from
    :mod:`saesteer.fasthead`: the exact float32 unembedding of the bf16 hidden state, screened by a 4-bit
    copy of it (≈ 85 MB more; about half the time of the bf16 head). The copy is made under ``lm.lock`` (no
    other thread's hook can be copied along) and is shared like the model: forwards on it hold ``lm.lock`` too.
    """
    if _is_fast_dtype(lm.model):
        return lm.model  # not cached: a value that refers to its weak key would keep the model alive
    with lm.lock:
        with _FAST_MODELS_LOCK:
            fast = _FAST_MODELS.get(lm.model)
        if fast is None:
            fast = _cast_copy(lm.model, FAST_DTYPE).eval()
            with _FAST_MODELS_LOCK:
                fast = _FAST_MODELS.setdefault(lm.model, fast)
            _greedy_head(lm, fast)  # built with the copy, so that the first fast stream does not pay for it
        return fast


def uses_fast_model(lm: LoadedModel, batch: int, fast: bool) -> bool:
    """Whether a decode of ``batch`` rows runs on a bf16 copy of ``lm.model`` (see :func:`decoding_model`),
    decided without building the copy: ``fast``, at most FAST_MAX_BATCH rows, and a model not already bf16."""
    if not fast or batch > FAST_MAX_BATCH:
        return False
    return not _is_fast_dtype(lm.model)


def default_fast(lm: LoadedModel) -> bool:
    """The ``fast`` the live pages (the lab, the duel) start with: on a CPU (the bf16 copy is faster there); on
    CUDA the exact model is fast already. The fluent defaults are calibrated with it too."""
    return lm.device.type == "cpu"


def decoding_model(lm: LoadedModel, batch: int, fast: bool) -> nn.Module:
    """The model a decode of ``batch`` rows runs on: ``fast_model(lm)`` when :func:`uses_fast_model`, else
    ``lm.model`` (the exact path)."""
    return fast_model(lm) if uses_fast_model(lm, batch, fast) else lm.model


@contextmanager
def _decoding(
    lm: LoadedModel, sae: LoadedSae | None, features: Sequence[int], strengths: Strengths, mode: SteerMode, batch: int, fast: bool
) -> Iterator[nn.Module]:
    """Hold ``lm.lock``, pick the model to decode ``batch`` rows with, steer it (when there are features);
    yields that model. Baseline and steered rows of one call always share the model."""
    with lm.lock:
        model = decoding_model(lm, batch, fast)
        if sae is not None and len(features):
            with steer(lm, sae, features, strengths, mode, model=model):
                yield model
        else:
            yield model


def _eos_ids(lm: LoadedModel) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None), lm.tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else src)
    return sorted(ids)



def _left_padded(lm: LoadedModel, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows left-padded into one batch on the model's device: ids, attention mask and positions (as
    transformers' generate: pads sit at 0, real tokens count from 0)."""
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), _pad_id(lm), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

def _pad_id(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad if pad is not None else 0)


def _limit_reason(lm: LoadedModel, limit: int, max_new_tokens: int) -> str:
    """Why the prompt limit is what it is, and what to do about it (the tail of the over-long-prompt message)."""
    if lm.context_length is None or limit < lm.context_length - max_new_tokens:
        return ": shorten the prompt"
    kept = f", {max_new_tokens} of them kept for the new tokens" if max_new_tokens else ""
    fewer = " or ask for fewer new tokens" if max_new_tokens else ""
    return f" (model '{lm.name}' has a context of {lm.context_length} tokens{kept}): shorten the prompt{fewer}"


def encode_prompts(lm: LoadedModel, prompts: Sequence[str], max_prompt_tokens: int = 2048, max_new_tokens: int = 0) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's BOS), refusing empty and over-long prompts.

    A prompt may have at most ``max_prompt_tokens`` tokens, and fewer where the model's context
    (``lm.context_length``) leaves less room once ``max_new_tokens`` positions are kept for the continuation:
    positions beyond the context would make the model fail mid-decode or continue from garbage.
    """
    limit, context = max_prompt_tokens, lm.context_length
    if context is not None:
        if max_new_tokens >= context:
            raise ConfigError(
                f"{max_new_tokens} new tokens do not fit model '{lm.name}', whose context is {context} tokens: ask for fewer new tokens"
            )
        limit = min(limit, context - max_new_tokens)
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError("the prompt is empty: give some text to continue")
        ids = lm.tokenizer(p)["input_ids"]
        if len(ids) > limit:
            raise ConfigError(f"the prompt is {len(ids)} tokens long; the limit is {limit} tokens{_limit_reason(lm, limit, max_new_tokens)}")
        out.append(list(ids))
    return out


def _last_hidden(model: nn.Module, input_ids, attention_mask, position_ids, cache):
    """Final-normed hidden states at the last position (batch, d) and the updated KV cache.

    The head runs outside the model, on these contiguous (batch, d) states: the model's own
    ``logits_to_keep=1`` slices a (batch, 1, d) view, which torch multiplies as a batched matmul against the
    weight broadcast per row, 9× slower than one matrix product at 440 rows (24.7 s vs 2.7 s per call).
    """
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)
    return out.last_hidden_state[:, -1].contiguous(), out.cache


def _head_logits(model: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits (batch, vocab) of final-normed ``hidden`` (batch, d), soft-capped in the head's dtype as
    the model itself does (a bf16 fast copy's logits are cast to float32 after its own bf16 soft-cap)."""
    logits = model.get_output_embeddings()(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


def _greedy_head(lm: LoadedModel, model: nn.Module):
    """The int4-screened greedy head for decoding on the fast copy ``model`` on a CPU, else None (the exact
    path, GPUs, heads with a bias, widths the int4 kernel cannot group). Soft-capping is monotone: the argmax
    of the capped logits is the argmax of the raw ones."""
    if model is lm.model or not fasthead.available(lm.device) or lm.d_model % fasthead.GROUP:
        return None
    if getattr(lm.lm_head, "bias", None) is not None or not hasattr(model, "get_decoder"):
        return None
    return fasthead.screened_head(lm.model, lm.lm_head.weight)


Seeds = int | Sequence[int]


def _require_sae(sae: LoadedSae | None, features: Sequence[int]) -> None:
    """Features steer along an SAE's decoder directions: refuse them without one (never drop them silently),
    and refuse ids the SAE does not have (naming the first and the allowed range) before any decoding."""
    if len(features) and sae is None:
        raise ConfigError("features were given without an SAE to take their directions from")
    for f in features if sae is not None else ():
        sae.check_feature(f)


def _seed_list(seed: Seeds, batch: int) -> list[int] | None:
    """None for one generator shared by the batch (an int seed), else one validated seed per row."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return None
    seeds = list(seed) if isinstance(seed, Sequence) else [seed]
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in seeds):
        raise ConfigError(f"seeds must be integers, got {seed!r}")
    if len(seeds) != batch:
        raise ConfigError(f"{len(seeds)} seeds given for {batch} prompt(s): give one seed, or one per prompt")
    return seeds


def _sample(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits`` (batch, vocab) from softmax(logits / T): one uniform number per row,
    from one shared generator or row i's from generators[i], inverted through the cumulative distribution
    (:func:`_inverse_cdf_sample`; a multinomial draw per row costs ≈ 60 ms on a CPU at a 262k vocabulary)."""
    if len(generators) == 1:
        u = torch.rand(logits.shape[0], generator=generators[0])
    else:
        u = torch.cat([torch.rand(1, generator=g) for g in generators])
    return _inverse_cdf_sample(logits, temperature, u).to(logits.device)


@torch.no_grad()
def _decode_loop(
    lm: LoadedModel,
    ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: Seeds,
    model: nn.Module | None = None,
    stop: threading.Event | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (batch,), step by step, with a KV cache and left padding.

    Greedy when temperature == 0, else samples softmax(logits / T): an int ``seed`` seeds one generator for
    the whole batch; a sequence gives row i its own generator seeded by seed[i], so that each row samples
    exactly as it would alone. Runs ``model`` (``lm.model`` by default; see :func:`decoding_model`). Ends
    after ``max_new_tokens`` steps or once every row has produced an end-of-sequence token. The caller must
    hold ``lm.lock`` (and any steering context on ``model``) while iterating.
    """
    device, batch = lm.device, len(ids)
    input_ids, mask, position_ids = _left_padded(lm, ids)
    eos = torch.tensor(_eos_ids(lm) or [-1], device=device)
    model = lm.model if model is None else model
    seeds = _seed_list(seed, batch)
    generators = None
    if temperature > 0:
        generators = [torch.Generator().manual_seed(int(x)) for x in (seeds if seeds is not None else [seed])]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = None
    screened = _greedy_head(lm, model) if generators is None else None
    head = model.get_output_embeddings()
    for step in range(max_new_tokens):
        hidden, cache = _last_hidden(model, input_ids, mask, position_ids, cache)
        if screened is not None:  # fast greedy: int4-screened argmax of the exact float32 head (fasthead.py)
            nxt = screened.argmax(hidden)
        elif generators is None:  # exact greedy: the float32 head in vocabulary blocks, never all logits at once
            nxt = fasthead.exact_argmax(hidden, head.weight, getattr(head, "bias", None), lm.softcap)
        else:
            logits = _head_logits(model, hidden, lm.softcap)
            nxt = _sample(logits, temperature, generators)
        yield nxt
        done |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or bool(done.all()) or (stop is not None and stop.is_set()):
            return
        input_ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        position_ids = position_ids[:, -1:] + 1


def _cut_at_eos(tokens: list[int], eos: Sequence[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def _decode_text(lm: LoadedModel, tokens: list[int]) -> str:
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


def generate(
    lm: LoadedModel,
    prompts: str | Sequence[str],
    *,
    sae: LoadedSae | None = None,
    features: Sequence[int] = (),
    strengths: Strengths | None = None,
    mode: SteerMode = "paper",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: Seeds = 0,
    max_prompt_tokens: int = 2048,
    fast: bool = False,
) -> list[str]:
    """Continuations (text after the prompt, special tokens dropped) of each prompt, steered or not.

    ``strengths``: one float per feature, or a (len(prompts), n_features) tensor so that one batched call
    sweeps many strengths. No steering when ``sae`` is None or ``features`` is empty; a strength of 0
    still installs the hook and leaves the output identical to the baseline. ``seed``: an int seeds one
    generator for the batch; one int per prompt gives each row its own generator (the row then samples as
    it would alone). ``fast`` decodes batches of up to ``FAST_MAX_BATCH`` rows on the bf16 copy of the
    whole model (:func:`fast_model`: about 2.5× faster single-stream on CPU, 0.54 GB more memory for Gemma 3
    270M; text may depart from float32 after a while, so compare fast runs only with fast runs);
    ``fast=False`` is the exact float32 path. Holds ``lm.lock`` for the whole generation.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError("no prompts given")
    features = tuple(features)
    _require_sae(sae, features)
    if strengths is None:
        strengths = [0.0] * len(features)
    s = strength_tensor(strengths, len(features), batch=len(prompts))
    # SteerParams holds the one set of limits for max_new_tokens / temperature / mode.
    SteerParams(max_new_tokens=max_new_tokens, temperature=temperature, mode=mode)
    _seed_list(seed, len(prompts))
    ids = encode_prompts(lm, prompts, max_prompt_tokens, max_new_tokens)
    eos = _eos_ids(lm)
    with _decoding(lm, sae, features, s, mode, len(ids), fast) as model:
        steps = list(_decode_loop(lm, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, model=model))
    tokens = torch.stack(steps, dim=1).tolist()  # (batch, steps)
    return [_decode_text(lm, _cut_at_eos(row, eos)) for row in tokens]


SAMPLE_BLOCK = 1024


def _inverse_cdf_sample(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` (batch, vocab) from softmax(logits / T), by inverting the cumulative
    distribution at ``uniforms`` (batch,) in [0, 1): one random number per row instead of a multinomial draw
    per row (torch.multinomial over a 262k vocabulary costs ≈ 60 ms a row on a CPU). Two levels, so that no
    (batch, vocab) cumulative sum is formed: the block of ``SAMPLE_BLOCK`` tokens is found on the cumulative
    sums of block totals (float64), then the token inside it. Exact in distribution (up to float rounding)."""
    b, v = logits.shape
    z = logits.float()
    z = torch.exp((z - z.amax(-1, keepdim=True)) / temperature)  # (batch, vocab), unnormalised probabilities
    pad = (-v) % SAMPLE_BLOCK
    if pad:
        z = torch.nn.functional.pad(z, (0, pad))
    blocks = z.view(b, -1, SAMPLE_BLOCK)  # (batch, n_blocks, block)
    totals = blocks.sum(-1, dtype=torch.float64)  # (batch, n_blocks)
    cum = totals.cumsum(-1)
    target = uniforms.double().to(cum.device)[:, None] * cum[:, -1:]  # (batch, 1)
    blk = torch.searchsorted(cum, target, right=True)[:, 0].clamp_(max=cum.shape[1] - 1)  # (batch,)
    before = torch.where(blk > 0, cum.gather(1, (blk - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(target[:, 0]))
    inner = blocks[torch.arange(b, device=blocks.device), blk].double().cumsum(-1)  # (batch, block)
    rest = (target[:, 0] - before)[:, None]
    pos = torch.searchsorted(inner, rest, right=True)[:, 0]
    pos = pos.clamp_(max=SAMPLE_BLOCK - 1)  # float rounding can put the target just past the block's end
    tok = blk * SAMPLE_BLOCK + pos
    return tok.clamp_(max=v - 1)


@torch.no_grad()
def sample_until_stop(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    sae: LoadedSae | None,
    features: Sequence[int],
    strengths: torch.Tensor,
    seeds: Sequence[int],
    temperature: float,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    mode: SteerMode = "paper",
    max_prompt_tokens: int = 2048,
) -> list[list[int]]:
    """Sampled continuations (token ids) of each prompt, row i steered with ``strengths[i]`` (rows, n_features)
    and sampled from its own generator seeded by ``seeds[i]``, so that each row is what it would be alone.

    A row ends after its first token in ``stop_ids`` (kept: the paper's ``stop_strings="."`` stops once a
    generated token contains the stop string) or before an end-of-sequence token (dropped), or after
    ``max_new_tokens``. Finished rows leave the batch (KV cache, steering strengths and all), so the
    remaining rows decode at the cost of their number. Sampling inverts each row's cumulative
    distribution at one uniform number from its generator (:func:`_inverse_cdf_sample`). Holds ``lm.lock``.
    """
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("no prompts given")
    if not temperature > 0:
        raise ConfigError(f"sampling needs a temperature > 0, got {temperature!r}")
    SteerParams(max_new_tokens=max_new_tokens, temperature=temperature, mode=mode)
    features = tuple(features)
    _require_sae(sae, features)
    seeds = _seed_list(list(seeds), len(prompts))
    ids = encode_prompts(lm, prompts, max_prompt_tokens, max_new_tokens)
    live = LiveRows(strengths if len(features) else torch.zeros(len(prompts), 0), len(features))
    if live.strengths.shape[0] != len(prompts):
        raise ConfigError(f"{live.strengths.shape[0]} rows of strengths for {len(prompts)} prompts")
    device, batch = lm.device, len(ids)
    input_ids, mask, position_ids = _left_padded(lm, ids)
    eos = set(_eos_ids(lm))
    stops = set(int(x) for x in stop_ids)
    generators = [torch.Generator().manual_seed(int(x)) for x in seeds]
    out: list[list[int]] = [[] for _ in prompts]
    alive = list(range(batch))
    with lm.lock:
        model = lm.model
        ctx = steer(lm, sae, features, live, mode, model=model) if sae is not None and features else nullcontext()
        with ctx:
            cache = None
            for step in range(max_new_tokens):
                hidden, cache = _last_hidden(model, input_ids, mask, position_ids, cache)
                logits = _head_logits(model, hidden, lm.softcap)  # (alive, vocab)
                u = torch.cat([torch.rand(1, generator=generators[r]) for r in alive])
                nxt = _inverse_cdf_sample(logits, temperature, u).tolist()
                keep = []
                for j, (r, tok) in enumerate(zip(alive, nxt)):
                    if tok in eos:
                        continue
                    out[r].append(tok)
                    if tok not in stops:
                        keep.append(j)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(alive):
                    sel = torch.tensor(keep, device=device)
                    cache.batch_select_indices(sel)
                    mask, position_ids = mask[sel], position_ids[sel]
                    alive = [alive[j] for j in keep]
                    live.alive = torch.tensor(alive)
                    nxt = [nxt[j] for j in keep]
                input_ids = torch.tensor(nxt, device=device)[:, None]
                mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=device)], dim=1)
                position_ids = position_ids[:, -1:] + 1
    return out


def stop_token_ids(lm: LoadedModel, text: str = ".") -> list[int]:
    """Ids of every vocabulary token whose decoded text contains ``text`` (for a one-character stop string,
    the tokens on which transformers' ``stop_strings`` ends a generation)."""
    tok = lm.tokenizer
    n = len(tok)
    special = set(tok.all_special_ids)
    pieces = tok.batch_decode([[i] for i in range(n)])
    return [i for i, s in enumerate(pieces) if text in s and i not in special]


def pair_strengths(params: SteerParams) -> torch.Tensor:
    """(2, n_features) strengths of a baseline/steered pair: row 0 all zeros (baseline), row 1 ``params.strengths``."""
    return torch.tensor([[0.0] * len(params.features), list(params.strengths)], dtype=torch.float32).reshape(2, len(params.features))


def generate_pair(lm: LoadedModel, sae: LoadedSae | None, prompt: str, params: SteerParams, *, fast: bool = False) -> tuple[str, str]:
    """(baseline, steered) continuations of one prompt, decoded as one 2-row batch with the same seed per row
    (what :func:`stream_pair` streams). On the exact path each equals the row generated alone."""
    _require_sae(sae, params.features)
    base, steered = generate(
        lm, [prompt, prompt], sae=sae, features=params.features, strengths=pair_strengths(params), mode=params.mode,
        max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=[params.seed, params.seed],
        max_prompt_tokens=params.max_prompt_tokens, fast=fast,
    )
    return base, steered


_DONE = object()


def _owns(lock) -> bool:
    is_owned = getattr(lock, "_is_owned", None)
    return bool(is_owned()) if is_owned is not None else False


class _RowText:
    """Turns one row's tokens into text increments: stops at its first end-of-sequence token and holds text
    back while it ends in a partial UTF-8 character or rewrites what was already emitted."""

    def __init__(self, lm: LoadedModel, eos: set[int]):
        self.lm, self.eos = lm, eos
        self.tokens: list[int] = []
        self.emitted = ""
        self.ended = False

    def push(self, token: int) -> str:
        if self.ended or token in self.eos:
            self.ended = True
            return ""
        self.tokens.append(token)
        text = _decode_text(self.lm, self.tokens)
        if text.startswith(self.emitted) and not text.endswith("\ufffd") and len(text) > len(self.emitted):
            piece, self.emitted = text[len(self.emitted):], text
            return piece
        return ""

    def flush(self) -> str:
        text = _decode_text(self.lm, self.tokens)
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            piece, self.emitted = text[len(self.emitted):], text
            return piece
        return ""


def _stream_rows(
    lm: LoadedModel,
    ids: list[list[int]],
    *,
    sae: LoadedSae | None,
    features: Sequence[int],
    strengths: Strengths,
    params: SteerParams,
    seed: Seeds,
    fast: bool,
) -> Iterator[tuple[str, ...]]:
    """Text increments of every row, one tuple per decoded step (steps where no row has new text are
    skipped), then one with any text held back at the end.

    Decoding runs in a worker thread that holds ``lm.lock`` (and the steering hook) from the first
    ``next()`` until it finishes; it never waits on the consumer, and closing the iterator early stops it
    after the current token and waits until it has released the lock. A caller that already holds
    ``lm.lock`` gets the tokens decoded in its own thread instead (a worker would wait for that lock forever).
    """
    eos = set(_eos_ids(lm))
    stop = threading.Event()

    def token_rows() -> Iterator[list[int]]:
        with _decoding(lm, sae, features, strengths, params.mode, len(ids), fast) as model:
            for nxt in _decode_loop(
                lm, ids, max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=seed, model=model, stop=stop
            ):
                yield nxt.tolist()

    def from_worker() -> Iterator[list[int]]:
        q: queue.SimpleQueue = queue.SimpleQueue()

        def work() -> None:
            try:
                for row in token_rows():
                    q.put(row)
            except BaseException as exc:  # handed to the consumer, which re-raises it in its own thread
                q.put(exc)
            finally:
                q.put(_DONE)

        worker = threading.Thread(target=work, name="saesteer-stream", daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join()

    def pieces() -> Iterator[tuple[str, ...]]:
        source = token_rows() if _owns(lm.lock) else from_worker()
        rows = [_RowText(lm, eos) for _ in ids]
        try:
            for step in source:
                out = tuple(r.push(t) for r, t in zip(rows, step))
                if any(out):
                    yield out
            out = tuple(r.flush() for r in rows)
            if any(out):
                yield out
        finally:
            source.close()

    return pieces()


def stream(lm: LoadedModel, prompt: str, *, sae: LoadedSae | None = None, params: SteerParams, fast: bool = False) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text increments, one token at a time (greedy or sampled).

    ``"".join(stream(...))`` equals ``generate(...)[0]`` for the same settings. Inputs are validated at
    call time. Decoding runs in a worker thread that holds ``lm.lock`` (and the steering hook) from the
    first ``next()`` until it finishes; it never waits on the consumer, and closing the iterator early
    (``close()``, ``break`` + garbage collection) stops it after the current token and waits until it
    has released the lock. A caller that already holds ``lm.lock`` gets the tokens decoded in its own
    thread instead (a worker would wait for that lock forever). ``fast``: see :func:`generate`.
    """
    _require_sae(sae, params.features)
    ids = encode_prompts(lm, [prompt], params.max_prompt_tokens, params.max_new_tokens)
    rows = _stream_rows(
        lm, ids, sae=sae, features=params.features, strengths=params.strengths, params=params, seed=params.seed, fast=fast
    )

    def pieces() -> Iterator[str]:
        try:
            for (piece,) in rows:
                yield piece
        finally:
            rows.close()

    return pieces()


def stream_pair(
    lm: LoadedModel, prompt: str, *, sae: LoadedSae | None = None, params: SteerParams, fast: bool = False
) -> Iterator[tuple[str, str]]:
    """Stream baseline and steered continuations of ``prompt`` together, as ONE 2-row batch.

    Row 0 is the baseline (every strength 0: the hook runs and changes nothing), row 1 is steered with
    ``params.strengths``; each row samples from its own generator seeded by ``params.seed``. Yields
    ``(baseline_piece, steered_piece)`` text increments step by step (either may be "" at a step: text held
    back at a partial character, or that row has ended). ``"".join`` of row 0's pieces equals
    ``generate_pair(...)[0]`` and of row 1's ``generate_pair(...)[1]``; on the exact path (``fast=False``)
    these equal each row decoded alone. With ``fast`` both rows use the bf16 copy (:func:`fast_model`).
    Threading, early close and a held ``lm.lock`` behave as in :func:`stream`.
    """
    _require_sae(sae, params.features)
    ids = encode_prompts(lm, [prompt], params.max_prompt_tokens, params.max_new_tokens) * 2
    rows = _stream_rows(
        lm, ids, sae=sae, features=params.features, strengths=pair_strengths(params), params=params,
        seed=[params.seed, params.seed], fast=fast,
    )

    def pieces() -> Iterator[tuple[str, str]]:
        try:
            yield from rows
        finally:
            rows.close()

    return pieces()


def stream_rows(
    lm: LoadedModel,
    prompt: str,
    *,
    sae: LoadedSae | None,
    features: Sequence[int],
    strengths: Strengths,
    params: SteerParams,
    fast: bool = False,
) -> Iterator[tuple[str, ...]]:
    """Stream one continuation of ``prompt`` per row of ``strengths`` (rows, n_features), as ONE batch.

    Row i is steered with ``strengths[i]`` on ``features`` (an all-zero row is the baseline: the hook runs and
    changes nothing); every row samples from its own generator seeded by ``params.seed``, so each row's text
    is the text that row gets alone (on the exact path) and rows never depend on each other: the concept
    duel's baseline | activation pick | output pick is one such batch, its strength strip another.
    ``params.features``/``params.strengths`` are ignored; its mode, max_new_tokens, temperature, seed and
    prompt limit apply. Yields one tuple of text increments per step (see :func:`stream_pair`); threading,
    early close and a held ``lm.lock`` behave as in :func:`stream`.
    """
    features = tuple(int(f) for f in features)
    _require_sae(sae, features)
    s = strength_tensor(strengths, len(features))
    if s.ndim != 2 or s.shape[0] < 1:
        raise ConfigError(f"stream_rows needs a (rows, n_features) tensor of strengths, got shape {tuple(s.shape)}")
    ids = encode_prompts(lm, [prompt], params.max_prompt_tokens, params.max_new_tokens) * s.shape[0]
    rows = _stream_rows(
        lm, ids, sae=sae if features else None, features=features, strengths=s, params=params,
        seed=[params.seed] * s.shape[0], fast=fast,
    )

    def pieces() -> Iterator[tuple[str, ...]]:
        try:
            yield from rows
        finally:
            rows.close()

    return pieces()
