"""The only code that touches the residual stream: forward hooks installed by context managers.

Every hook is removed in ``finally``; nothing stays attached to a (shared) model after a ``with`` block.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

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
    s = strength_tensor(strengths, len(features))
    dirs = sae.directions(list(features)).float()  # (n, d_model)
    sae_dtype = sae.sae.W_dec.dtype
    sae_device = sae.sae.W_dec.device

    def row_strengths(batch: int, device: torch.device) -> torch.Tensor:  # (batch or 1, n)
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
    lm: LoadedModel, sae: LoadedSae, features: Sequence[int], strengths: Strengths, mode: SteerMode = "paper"
) -> Iterator[None]:
    """Steer every forward of ``lm`` inside the block (see :func:`steering_fn`); holds ``lm.lock`` throughout.

    With no features the block runs unsteered (still under the lock). The hook is removed on exit, also
    when the block raises.
    """
    fn = steering_fn(sae, features, strengths, mode) if len(features) else None
    module = resolve_module(lm, sae.hook_name)
    with lm.lock:
        if fn is None:
            yield
        else:
            with residual_edit(module, fn):
                yield


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------

_FAST_HEADS: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()
_FAST_HEADS_LOCK = threading.Lock()


def _fast_head_weight(lm: LoadedModel) -> torch.Tensor:
    """A bf16 copy of the unembedding, made once per model (batch-1 CPU decode is bound by reading it)."""
    with _FAST_HEADS_LOCK:
        w = _FAST_HEADS.get(lm.model)
        if w is None:
            w = lm.lm_head.weight.detach().to(torch.bfloat16).contiguous()
            _FAST_HEADS[lm.model] = w
        return w


def _eos_ids(lm: LoadedModel) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None), lm.tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else src)
    return sorted(ids)


def _pad_id(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad if pad is not None else 0)


def encode_prompts(lm: LoadedModel, prompts: Sequence[str], max_prompt_tokens: int = 2048) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's BOS), refusing empty and over-long prompts."""
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError("the prompt is empty: give some text to continue")
        ids = lm.tokenizer(p)["input_ids"]
        if len(ids) > max_prompt_tokens:
            raise ConfigError(f"the prompt is {len(ids)} tokens long; the limit is {max_prompt_tokens} tokens")
        out.append(list(ids))
    return out


def _forward_last(lm: LoadedModel, input_ids, attention_mask, position_ids, cache, fast: bool):
    """Logits at the last position (batch, vocab) in float32, and the updated KV cache."""
    if fast and input_ids.shape[0] == 1:
        out = lm.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        hidden = out.last_hidden_state[:, -1]  # (1, d_model), already final-normed
        logits = F.linear(hidden.to(torch.bfloat16), _fast_head_weight(lm)).float()
        if getattr(lm.lm_head, "bias", None) is not None:
            logits = logits + lm.lm_head.bias.float()
        if lm.softcap:
            logits = torch.tanh(logits / lm.softcap) * lm.softcap
        return logits, out.cache
    out = lm.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1].float(), out.cache


@torch.no_grad()
def _decode_loop(
    lm: LoadedModel,
    ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    fast: bool = False,
    stop: threading.Event | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (batch,), step by step, with a KV cache and left padding.

    Greedy when temperature == 0, else samples softmax(logits / T) with a generator seeded by ``seed``.
    Ends after ``max_new_tokens`` steps or once every row has produced an end-of-sequence token.
    The caller must hold ``lm.lock`` (and any steering context) while iterating.
    """
    device, batch, width = lm.device, len(ids), max(len(r) for r in ids)
    input_ids = torch.full((batch, width), _pad_id(lm), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    # Same positions as transformers' generate: pads sit at 0, real tokens count from 0.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(_eos_ids(lm) or [-1], device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = None
    for step in range(max_new_tokens):
        logits, cache = _forward_last(lm, input_ids, mask, position_ids, cache, fast)  # (batch, vocab)
        if generator is None:
            nxt = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
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
    seed: int = 0,
    max_prompt_tokens: int = 2048,
    fast: bool = False,
) -> list[str]:
    """Continuations (text after the prompt, special tokens dropped) of each prompt, steered or not.

    ``strengths``: one float per feature, or a (len(prompts), n_features) tensor so that one batched call
    sweeps many strengths. No steering when ``sae`` is None or ``features`` is empty; a strength of 0
    still installs the hook and leaves the output identical to the baseline. ``fast`` holds a bf16 copy
    of the unembedding for batch-1 decoding (CPU speed-up; text may differ slightly from float32, so
    compare fast runs only with fast runs). Holds ``lm.lock`` for the whole generation.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError("no prompts given")
    features = tuple(features)
    if features and sae is None:
        raise ConfigError("features were given without an SAE to take their directions from")
    if strengths is None:
        strengths = [0.0] * len(features)
    s = strength_tensor(strengths, len(features), batch=len(prompts))
    # SteerParams holds the one set of limits for max_new_tokens / temperature / mode.
    SteerParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, mode=mode)
    ids = encode_prompts(lm, prompts, max_prompt_tokens)
    eos = _eos_ids(lm)
    with lm.lock:
        ctx = steer(lm, sae, features, s, mode) if sae is not None and features else nullcontext()
        with ctx:
            steps = list(_decode_loop(lm, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, fast=fast))
    tokens = torch.stack(steps, dim=1).tolist()  # (batch, steps)
    return [_decode_text(lm, _cut_at_eos(row, eos)) for row in tokens]


def generate_pair(lm: LoadedModel, sae: LoadedSae | None, prompt: str, params: SteerParams, *, fast: bool = False) -> tuple[str, str]:
    """(baseline, steered) continuations of one prompt with the same seed, under one hold of ``lm.lock``."""
    common = dict(
        mode=params.mode,
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        seed=params.seed,
        max_prompt_tokens=params.max_prompt_tokens,
        fast=fast,
    )
    with lm.lock:
        base = generate(lm, prompt, **common)[0]
        steered = generate(lm, prompt, sae=sae, features=params.features, strengths=params.strengths, **common)[0]
    return base, steered


_DONE = object()


def _owns(lock) -> bool:
    is_owned = getattr(lock, "_is_owned", None)
    return bool(is_owned()) if is_owned is not None else False


def stream(lm: LoadedModel, prompt: str, *, sae: LoadedSae | None = None, params: SteerParams, fast: bool = False) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text increments, one token at a time (greedy or sampled).

    ``"".join(stream(...))`` equals ``generate(...)[0]`` for the same settings. Inputs are validated at
    call time. Decoding runs in a worker thread that holds ``lm.lock`` (and the steering hook) from the
    first ``next()`` until it finishes; it never waits on the consumer, and closing the iterator early
    (``close()``, ``break`` + garbage collection) stops it after the current token and waits until it
    has released the lock. A caller that already holds ``lm.lock`` gets the tokens decoded in its own
    thread instead (a worker would wait for that lock forever).
    """
    if params.features and sae is None:
        raise ConfigError("features were given without an SAE to take their directions from")
    if sae is not None:
        for f in params.features:
            sae.check_feature(f)
    ids = encode_prompts(lm, [prompt], params.max_prompt_tokens)
    eos = set(_eos_ids(lm))
    stop = threading.Event()

    def token_ids() -> Iterator[int]:
        with lm.lock:
            ctx = steer(lm, sae, params.features, params.strengths, params.mode) if sae is not None and params.features else nullcontext()
            with ctx:
                for nxt in _decode_loop(
                    lm, ids, max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=params.seed, fast=fast, stop=stop
                ):
                    yield int(nxt[0])

    def from_worker() -> Iterator[int]:
        q: queue.SimpleQueue = queue.SimpleQueue()

        def work() -> None:
            try:
                for t in token_ids():
                    q.put(t)
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

    def pieces() -> Iterator[str]:
        source = token_ids() if _owns(lm.lock) else from_worker()
        tokens: list[int] = []
        emitted = ""
        try:
            for t in source:
                if t in eos:
                    continue
                tokens.append(t)
                text = _decode_text(lm, tokens)
                # Hold back while the text ends in a partial UTF-8 character or rewrites earlier text.
                if text.startswith(emitted) and not text.endswith("\ufffd") and len(text) > len(emitted):
                    yield text[len(emitted):]
                    emitted = text
            text = _decode_text(lm, tokens)
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]
        finally:
            source.close()

    return pieces()
