"""Steering core: the residual edit against the slow SAE encode/decode formula, invariants, generation."""

from __future__ import annotations

import copy
import gc
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch

from saesteer import steering
from saesteer.config import ConfigError, SteerParams
from saesteer.saes import SaeLoadError
from saesteer.steering import (
    _decode_loop,
    _head_logits,
    _last_hidden,
    capture_residuals,
    decoding_model,
    encode_prompts,
    fast_model,
    generate,
    generate_pair,
    steer,
    stream,
    stream_pair,
)
from saesteer.testing import make_tiny_model, make_tiny_sae

PROMPTS = ["the king of france", "my love", "from my experience , the city is", "once i heard about the sea"]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """max |actual − expected| <= rel · max |expected|: float32 keeps ~7 digits of vectors whose entries reach ~40."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} × {scale:.3g}"


def assert_no_hooks(lm) -> None:
    for name, module in lm.model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name or 'model'}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name or 'model'}"


def batch(lm, prompts):
    enc = lm.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def resid(lm, layer, ids, mask):
    with capture_residuals(lm, [layer]) as store, torch.no_grad():
        lm.model(input_ids=ids, attention_mask=mask)
    return store[layer]


def slow_paper_last(sae, x_last, features, strengths):
    """decode(a + Σ c_i·e_{f_i}) + (x − decode(a)), c_i = s_i · max_j a_j, with the SAE's own encode/decode.

    Computed in float64 on a copy of the SAE: in float32 the difference of two large reconstructions loses
    more than the 1e-5 the fast path is held to.
    """
    sae = copy.deepcopy(sae.sae).double()
    x_last, strengths = x_last.double(), strengths.double()
    a = sae.encode(x_last)  # (batch, d_sae)
    peak = a.max(dim=-1).values  # (batch,)
    a2 = a.clone()
    for i, f in enumerate(features):
        s = strengths[:, i] if strengths.ndim == 2 else strengths[i]
        a2[:, f] += s * peak
    return (sae.decode(a2) + (x_last - sae.decode(a))).float()


@pytest.fixture(scope="module", params=["topk", "standard"])
def any_sae(request):
    return make_tiny_sae(arch=request.param)


@pytest.mark.parametrize("features,strengths", [([5], [4.0]), ([5, 17, 99], [2.0, -1.5, 6.0])])
def test_paper_mode_equals_slow_encode_decode(tiny_lm, any_sae, features, strengths):
    ids, mask = batch(tiny_lm, PROMPTS)
    x = resid(tiny_lm, any_sae.layer, ids, mask)
    with steer(tiny_lm, any_sae, features, strengths, mode="paper"):
        x_steered = resid(tiny_lm, any_sae.layer, ids, mask)
    with torch.no_grad():
        ref = slow_paper_last(any_sae, x[:, -1], features, torch.tensor(strengths))
    assert_close_rel(x_steered[:, -1], ref)
    assert torch.equal(x_steered[:, :-1], x[:, :-1])
    assert not torch.allclose(x_steered[:, -1], x[:, -1], atol=1e-3)  # the edit is not a no-op
    assert_no_hooks(tiny_lm)


def test_paper_mode_multi_feature_is_sum_of_single_terms(tiny_lm, tiny_sae):
    ids, mask = batch(tiny_lm, PROMPTS)
    x = resid(tiny_lm, tiny_sae.layer, ids, mask)
    deltas = []
    for f, s in [(5, 2.0), (17, -1.5), (99, 6.0)]:
        with steer(tiny_lm, tiny_sae, [f], [s]):
            deltas.append(resid(tiny_lm, tiny_sae.layer, ids, mask) - x)
    with steer(tiny_lm, tiny_sae, [5, 17, 99], [2.0, -1.5, 6.0]):
        joint = resid(tiny_lm, tiny_sae.layer, ids, mask) - x
    assert_close_rel(joint, sum(deltas))


def test_paper_mode_per_row_strengths(tiny_lm, tiny_sae):
    ids, mask = batch(tiny_lm, PROMPTS)
    x = resid(tiny_lm, tiny_sae.layer, ids, mask)
    s = torch.tensor([[0.0, 1.0], [2.0, -3.0], [8.0, 0.5], [-1.0, 20.0]])
    with steer(tiny_lm, tiny_sae, [5, 17], s):
        x_steered = resid(tiny_lm, tiny_sae.layer, ids, mask)
    with torch.no_grad():
        ref = slow_paper_last(tiny_sae, x[:, -1], [5, 17], s)
    assert_close_rel(x_steered[:, -1], ref)
    with pytest.raises(ConfigError, match="rows"), steer(tiny_lm, tiny_sae, [5, 17], s[:3]):
        resid(tiny_lm, tiny_sae.layer, ids, mask)
    assert_no_hooks(tiny_lm)


def test_additive_mode_adds_coeff_times_decoder_row_everywhere(tiny_lm, tiny_sae):
    ids, mask = batch(tiny_lm, PROMPTS)
    x = resid(tiny_lm, tiny_sae.layer, ids, mask)
    with steer(tiny_lm, tiny_sae, [7, 40], [3.0, -2.0], mode="additive"):
        x_steered = resid(tiny_lm, tiny_sae.layer, ids, mask)
    w = tiny_sae.sae.W_dec
    assert_close_rel(x_steered, x + 3.0 * w[7] - 2.0 * w[40])


@pytest.mark.parametrize("mode", ["paper", "additive"])
def test_strength_zero_is_identical_to_baseline(tiny_lm, tiny_sae, mode):
    ids, mask = batch(tiny_lm, PROMPTS)
    with torch.no_grad():
        base = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        module = tiny_lm.layers[tiny_sae.layer]
        with steer(tiny_lm, tiny_sae, [5, 17], [0.0, -0.0], mode=mode):
            assert len(module._forward_hooks) == 1  # the hook really runs
            steered = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(base, steered)
    kw = dict(max_new_tokens=12)
    assert generate(tiny_lm, PROMPTS, sae=tiny_sae, features=[5, 17], strengths=[0.0, 0.0], mode=mode, **kw) == generate(tiny_lm, PROMPTS, **kw)


def test_no_hook_left_after_normal_exit_and_exception(tiny_lm, tiny_sae):
    ids, mask = batch(tiny_lm, PROMPTS[:1])
    for mode in ("paper", "additive"):
        with steer(tiny_lm, tiny_sae, [1], [1.0], mode=mode), torch.no_grad():
            tiny_lm.model(input_ids=ids, attention_mask=mask)
        assert_no_hooks(tiny_lm)
        with pytest.raises(KeyError), steer(tiny_lm, tiny_sae, [1], [1.0], mode=mode):
            raise KeyError("boom")
        assert_no_hooks(tiny_lm)
    # An exception raised inside the forward, by the steering hook itself (3 rows of strengths, batch 1).
    with pytest.raises(ConfigError), steer(tiny_lm, tiny_sae, [1], torch.ones(3, 1)), capture_residuals(tiny_lm, [0, 3]), torch.no_grad():
        tiny_lm.model(input_ids=ids, attention_mask=mask)
    assert_no_hooks(tiny_lm)
    assert tiny_lm.lock.acquire(blocking=False)  # and the lock was released
    tiny_lm.lock.release()


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_generate_matches_transformers_generate(monkeypatch, softcap):
    """The manual KV-cache loop (left padding, positions, EOS) and its blocked greedy head (blocks of 7
    vocabulary rows here, so that the argmax crosses many blocks) against transformers' own greedy generate."""
    from saesteer import fasthead

    lm = make_tiny_model(softcap=softcap)
    monkeypatch.setattr(fasthead, "EXACT_BLOCK", 7)
    ids, mask = batch(lm, PROMPTS)
    with torch.no_grad():
        ref = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False)
    expected = lm.tokenizer.batch_decode(ref[:, ids.shape[1]:], skip_special_tokens=True)
    assert generate(lm, PROMPTS, max_new_tokens=15) == expected


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("block", [1, 5, 64, 10_000])
def test_exact_blocked_argmax_equals_the_full_argmax(monkeypatch, softcap, block):
    """Bit for bit the argmax of the full logits: the first index among ties (a duplicated vocabulary row in
    another block; with a tight soft-cap, values that tanh rounds together), a bias, and NaN counted as the
    largest value (as torch.argmax does)."""
    from saesteer import fasthead

    monkeypatch.setattr(fasthead, "EXACT_BLOCK", block)
    torch.manual_seed(0)
    weight = torch.randn(300, 32)
    weight[250] = weight[3]  # ties across blocks: the earlier row must win
    weight[120] = weight[3]
    bias = torch.randn(300) * 0.1
    hidden = torch.randn(64, 32) * 4
    hidden[5] = weight[3] * 10  # row 5 picks the tied rows
    hidden[6] = float("nan")  # all-NaN logits: index 0
    for b in (None, bias):
        full = hidden @ weight.T + (0 if b is None else b)
        if softcap:
            full = torch.tanh(full / softcap) * softcap
        got = fasthead.exact_argmax(hidden, weight, b, softcap)
        assert torch.equal(got, full.argmax(dim=-1))
    assert int(fasthead.exact_argmax(hidden, weight)[5]) == 3
    partial = hidden[:2].clone()
    partial_nan = weight.clone()
    partial_nan[200] = float("nan")  # a NaN logit in a later block wins, as in torch.argmax
    assert torch.equal(fasthead.exact_argmax(partial, partial_nan), (partial @ partial_nan.T).argmax(dim=-1))


def test_per_row_strengths_equal_rows_generated_one_by_one(tiny_lm, tiny_sae):
    prompts = [p for p in PROMPTS[:3] for _ in range(3)]
    s = torch.tensor([[0.0, 0.0], [1.0, 0.5], [8.0, -2.0]] * 3)
    for mode in ("paper", "additive"):
        batched = generate(tiny_lm, prompts, sae=tiny_sae, features=[5, 17], strengths=s, mode=mode, max_new_tokens=12)
        single = [
            generate(tiny_lm, p, sae=tiny_sae, features=[5, 17], strengths=row.tolist(), mode=mode, max_new_tokens=12)[0]
            for p, row in zip(prompts, s)
        ]
        assert batched == single
        assert len(set(batched[:3])) > 1  # the strengths do change the text


def test_sampling_is_reproducible(tiny_lm, tiny_sae):
    kw = dict(sae=tiny_sae, features=[5], strengths=[2.0], max_new_tokens=12, temperature=1.0)
    a = generate(tiny_lm, PROMPTS, seed=3, **kw)
    assert a == generate(tiny_lm, PROMPTS, seed=3, **kw)
    assert a != generate(tiny_lm, PROMPTS, seed=4, **kw)
    assert a != generate(tiny_lm, PROMPTS, **{**kw, "temperature": 0.0})


def test_generate_pair(tiny_lm, tiny_sae):
    params = SteerParams(features=(5,), strengths=(8.0,), max_new_tokens=10)
    base, steered = generate_pair(tiny_lm, tiny_sae, PROMPTS[0], params)
    assert base == generate(tiny_lm, PROMPTS[0], max_new_tokens=10)[0]
    assert steered == generate(tiny_lm, PROMPTS[0], sae=tiny_sae, features=[5], strengths=[8.0], max_new_tokens=10)[0]
    assert base != steered


def test_concurrent_threads_do_not_see_each_others_hooks(tiny_lm):
    saes = [make_tiny_sae(seed=i) for i in range(4)]
    jobs = [
        dict(sae=saes[0], features=[5], strengths=[8.0]),
        dict(sae=saes[1], features=[17, 3], strengths=[4.0, -6.0], mode="additive"),
        dict(),  # unsteered
        dict(sae=saes[3], features=[99], strengths=[20.0]),
    ]
    alone = [generate(tiny_lm, PROMPTS, max_new_tokens=10, **job) for job in jobs]
    assert len({tuple(a) for a in alone}) == 4
    results: dict[int, list[list[str]]] = {i: [] for i in range(4)}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[i].append(generate(tiny_lm, PROMPTS, max_new_tokens=10, **jobs[i]))
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        assert results[i] == [alone[i]] * 3
    assert_no_hooks(tiny_lm)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stream_concatenated_equals_generate(tiny_lm, tiny_sae, temperature):
    for features, strengths in [((), ()), ((5, 17), (3.0, -1.0))]:
        params = SteerParams(features=features, strengths=strengths, max_new_tokens=14, temperature=temperature, seed=2)
        pieces = list(stream(tiny_lm, PROMPTS[2], sae=tiny_sae, params=params))
        expected = generate(
            tiny_lm, PROMPTS[2], sae=tiny_sae, features=features, strengths=strengths, max_new_tokens=14, temperature=temperature, seed=2
        )[0]
        assert "".join(pieces) == expected
        if temperature == 0:
            assert len(pieces) > 1
    assert_no_hooks(tiny_lm)


@pytest.mark.parametrize("streamer", [stream, stream_pair], ids=["stream", "stream_pair"])
def test_stream_closed_early_releases_lock_and_hooks(tiny_lm, tiny_sae, streamer):
    """Closed after its first piece, a stream leaves no hook and frees the model's lock; the lock is an RLock,
    so only another thread can tell that it is free."""
    params = SteerParams(features=(5,), strengths=(4.0,), max_new_tokens=200)
    it = streamer(tiny_lm, PROMPTS[0], sae=tiny_sae, params=params)
    next(it)
    it.close()
    assert_no_hooks(tiny_lm)
    got = []
    other = threading.Thread(target=lambda: got.append(tiny_lm.lock.acquire(timeout=10) and tiny_lm.lock.release() is None))
    other.start()
    other.join()
    assert got == [True]


def test_stream_inside_a_held_lock_decodes_inline(tiny_lm, tiny_sae):
    params = SteerParams(features=(5,), strengths=(3.0,), max_new_tokens=10)
    expected = generate(tiny_lm, PROMPTS[1], sae=tiny_sae, features=[5], strengths=[3.0], max_new_tokens=10)[0]
    with tiny_lm.lock:  # a worker thread would wait for this lock forever
        it = stream(tiny_lm, PROMPTS[1], sae=tiny_sae, params=params)
        first = next(it)
        assert len(tiny_lm.layers[tiny_sae.layer]._forward_hooks) == 1
        assert first + "".join(it) == expected
    assert_no_hooks(tiny_lm)


def test_stream_validates_at_call_time(tiny_lm, tiny_sae):
    with pytest.raises(ConfigError, match="empty"):
        stream(tiny_lm, "  ", sae=tiny_sae, params=SteerParams())
    with pytest.raises(SaeLoadError, match="out of range"):
        stream(tiny_lm, "the sea", sae=tiny_sae, params=SteerParams(features=(128,), strengths=(1.0,)))


def test_generate_rejects_bad_input(tiny_lm, tiny_sae):
    with pytest.raises(ConfigError, match="empty"):
        generate(tiny_lm, "")
    with pytest.raises(ConfigError, match="limit is 3 tokens"):
        generate(tiny_lm, "the king of france", max_prompt_tokens=3)
    with pytest.raises(SaeLoadError, match="from 0 to 127"):
        generate(tiny_lm, "the sea", sae=tiny_sae, features=[128], strengths=[1.0])
    with pytest.raises(ConfigError, match="finite"):
        generate(tiny_lm, "the sea", sae=tiny_sae, features=[1], strengths=[float("nan")])
    with pytest.raises(ConfigError, match="out of range"):
        generate(tiny_lm, "the sea", sae=tiny_sae, features=[1], strengths=[1e6])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(tiny_lm, "the sea", max_new_tokens=0)
    with pytest.raises(ConfigError, match="one strength per feature"):
        generate(tiny_lm, "the sea", sae=tiny_sae, features=[1, 2], strengths=[1.0])
    with pytest.raises(ConfigError, match="rows"):
        generate(tiny_lm, ["the sea", "a cat"], sae=tiny_sae, features=[1], strengths=torch.ones(3, 1))
    with pytest.raises(ConfigError, match="mode"):
        generate(tiny_lm, "the sea", sae=tiny_sae, features=[1], strengths=[1.0], mode="sideways")
    assert_no_hooks(tiny_lm)


# ---------------------------------------------------------------------------------------------------
# Side-by-side streaming: one 2-row batch (row 0 baseline, row 1 steered)


def pair_texts(it) -> tuple[str, str]:
    steps = list(it)
    assert all(isinstance(b, str) and isinstance(t, str) for b, t in steps)
    return "".join(b for b, _ in steps), "".join(t for _, t in steps)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("mode", ["paper", "additive"])
def test_stream_pair_equals_each_row_alone(tiny_lm, tiny_sae, temperature, mode):
    """Exact path: the paired stream is the baseline run and the steered run, each decoded on its own."""
    strengths = (8.0, -2.0) if mode == "paper" else (20.0, -5.0)
    for prompt, seed in [(PROMPTS[0], 0), (PROMPTS[2], 5)]:
        params = SteerParams(features=(5, 17), strengths=strengths, mode=mode, max_new_tokens=16, temperature=temperature, seed=seed)
        base, steered = pair_texts(stream_pair(tiny_lm, prompt, sae=tiny_sae, params=params))
        kw = {"max_new_tokens": 16, "temperature": temperature, "seed": seed}
        assert base == generate(tiny_lm, prompt, **kw)[0]
        assert steered == generate(tiny_lm, prompt, sae=tiny_sae, features=[5, 17], strengths=list(strengths), mode=mode, **kw)[0]
        assert base != steered
        assert (base, steered) == generate_pair(tiny_lm, tiny_sae, prompt, params)
    assert_no_hooks(tiny_lm)


def test_stream_pair_updates_both_columns_step_by_step(tiny_lm, tiny_sae):
    params = SteerParams(features=(5,), strengths=(8.0,), max_new_tokens=12)
    steps = list(stream_pair(tiny_lm, PROMPTS[1], sae=tiny_sae, params=params))
    assert len(steps) > 1
    assert sum(1 for b, t in steps if b and t) > 1  # most steps carry new text for both columns


def test_stream_pair_rows_end_independently(tiny_lm, tiny_sae):
    """A row that reaches end-of-sequence stops growing while the other row goes on (as when run alone)."""
    ended_early = 0
    for seed in range(12):
        params = SteerParams(features=(5,), strengths=(8.0,), max_new_tokens=40, temperature=1.5, seed=seed)
        kw = {"max_new_tokens": 40, "temperature": 1.5, "seed": seed}
        alone = (generate(tiny_lm, PROMPTS[3], **kw)[0], generate(tiny_lm, PROMPTS[3], sae=tiny_sae, features=[5], strengths=[8.0], **kw)[0])
        assert pair_texts(stream_pair(tiny_lm, PROMPTS[3], sae=tiny_sae, params=params)) == alone
        ended_early += sum(len(tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"]) < 40 for t in alone)
    assert ended_early, "no row ended early: the test did not exercise end-of-sequence"


def test_per_row_seeds_sample_each_row_as_alone(tiny_lm):
    kw = {"max_new_tokens": 12, "temperature": 1.0}
    rows = generate(tiny_lm, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], seed=[3, 4, 3], **kw)
    assert rows == [generate(tiny_lm, PROMPTS[0], seed=3, **kw)[0], generate(tiny_lm, PROMPTS[1], seed=4, **kw)[0], rows[0]]
    with pytest.raises(ConfigError, match="seeds given"):
        generate(tiny_lm, PROMPTS[:2], seed=[1, 2, 3], **kw)
    with pytest.raises(ConfigError, match="integers"):
        generate(tiny_lm, PROMPTS[:2], seed=[1, 2.5], **kw)


def test_stream_pair_validates_at_call_time(tiny_lm, tiny_sae):
    with pytest.raises(ConfigError, match="empty"):
        stream_pair(tiny_lm, " ", sae=tiny_sae, params=SteerParams())
    with pytest.raises(SaeLoadError, match="out of range"):
        stream_pair(tiny_lm, "the sea", sae=tiny_sae, params=SteerParams(features=(128,), strengths=(1.0,)))
    with pytest.raises(ConfigError, match="without an SAE"):
        stream_pair(tiny_lm, "the sea", params=SteerParams(features=(1,), strengths=(1.0,)))


# ---------------------------------------------------------------------------------------------------
# Fast decode: a bf16 copy of the whole model for batches of 1 and 2


@pytest.fixture
def fresh_lm():
    """A model of its own, so that the fast copy cached for it is not the session model's."""
    return make_tiny_model()


def test_fast_copy_is_built_once_and_leaves_the_model_alone():
    lm = make_tiny_model()
    copies: list = []
    threads = [threading.Thread(target=lambda: copies.append(fast_model(lm))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fast = fast_model(lm)
    assert all(c is fast for c in copies) and fast is not lm.model
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    assert fast.lm_head.weight is fast.model.embed_tokens.weight  # tied weights stay tied (one copy, not two)
    assert all(not p.requires_grad for p in fast.parameters())
    generate(lm, PROMPTS[0], max_new_tokens=3, fast=True)
    assert fast_model(lm) is fast
    assert all(decoding_model(lm, b, True) is fast for b in (1, 2, 3, steering.FAST_MAX_BATCH))  # the duel's 3 rows too
    assert decoding_model(lm, steering.FAST_MAX_BATCH + 1, True) is lm.model and decoding_model(lm, 1, False) is lm.model
    # The cache holds the copy only while the model lives (the copy does not refer back to it).
    gone = weakref.ref(fast)
    del lm, fast, copies
    gc.collect()
    assert gone() is None


def test_uses_fast_model_names_the_decoding_model_without_building_the_copy(monkeypatch):
    """The pages' caption asks :func:`uses_fast_model`; it must agree with what :func:`decoding_model` picks, and
    answer before any bf16 copy exists (building one takes seconds and memory)."""
    import dataclasses

    lm = make_tiny_model(seed=3)  # a model of its own: no copy of it exists yet
    built = []
    real = steering.fast_model
    monkeypatch.setattr(steering, "fast_model", lambda m: built.append(m) or real(m))
    cases = [(b, f) for b in (1, 2, 3, steering.FAST_MAX_BATCH, steering.FAST_MAX_BATCH + 1) for f in (True, False)]
    said = {c: steering.uses_fast_model(lm, *c) for c in cases}
    assert not built
    assert said[(3, True)] and not said[(3, False)] and not said[(steering.FAST_MAX_BATCH + 1, True)]
    for (b, f), fast in said.items():
        assert (steering.decoding_model(lm, b, f) is not lm.model) == fast
    bf16 = dataclasses.replace(lm, model=copy.deepcopy(lm.model).to(torch.bfloat16), dtype=torch.bfloat16)
    assert not steering.uses_fast_model(bf16, 2, True) and steering.decoding_model(bf16, 2, True) is bf16.model  # its own copy


def test_a_bf16_model_is_its_own_fast_copy():
    lm = make_tiny_model()
    lm.model.to(torch.bfloat16)
    assert fast_model(lm) is lm.model
    assert generate(lm, PROMPTS[0], max_new_tokens=4, fast=True) == generate(lm, PROMPTS[0], max_new_tokens=4)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fast_copy_logits_are_float32_and_close(softcap):
    """bf16 keeps ~3 significant digits: the fast copy's logits stay near the float32 model's."""
    lm = make_tiny_model(softcap=softcap)
    ids, mask = batch(lm, PROMPTS[:2])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        exact = _head_logits(lm.model, _last_hidden(lm.model, ids, mask, pos, None)[0], softcap)
        fast = _head_logits(fast_model(lm), _last_hidden(fast_model(lm), ids, mask, pos, None)[0], softcap)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, exact, atol=3e-2 * exact.abs().max().item(), rtol=0)
    assert not torch.equal(fast, exact)  # the fast path is really taken


def test_fast_path_steers_the_copy_and_leaves_no_hooks(fresh_lm, tiny_sae):
    lm = fresh_lm
    fast = fast_model(lm)
    params = SteerParams(features=(5,), strengths=(20.0,), max_new_tokens=12)
    with lm.lock:  # inline decoding: the hook can be seen while the stream is open
        it = stream(lm, PROMPTS[0], sae=tiny_sae, params=params, fast=True)
        next(it)
        assert len(fast.model.layers[tiny_sae.layer]._forward_hooks) == 1
        assert_no_hooks(lm)  # the float32 model is not steered
        it.close()
    assert_no_hooks(lm)
    assert_no_hooks(SimpleNamespace(model=fast))
    base = generate(lm, PROMPTS[0], max_new_tokens=12, fast=True)[0]
    steered = generate(lm, PROMPTS[0], sae=tiny_sae, features=[5], strengths=[20.0], max_new_tokens=12, fast=True)[0]
    assert base != steered
    assert "".join(stream(lm, PROMPTS[0], sae=tiny_sae, params=params, fast=True)) == steered
    assert pair_texts(stream_pair(lm, PROMPTS[0], sae=tiny_sae, params=params, fast=True)) == generate_pair(lm, tiny_sae, PROMPTS[0], params, fast=True)
    zero = generate(lm, PROMPTS[0], sae=tiny_sae, features=[5], strengths=[0.0], max_new_tokens=12, fast=True)[0]
    assert zero == base  # strength 0 on the bf16 copy is still the fast baseline
    with pytest.raises(KeyError), steer(lm, tiny_sae, [5], [1.0], model=fast):
        raise KeyError("boom")
    assert_no_hooks(lm)
    assert_no_hooks(SimpleNamespace(model=fast))


# ---------------------------------------------------------------------------------------------------
# Fast greedy head: int4 screen + exact float32 rescoring (fasthead.py) against the plain float32 head


def test_screened_head_picks_the_float32_argmax():
    from saesteer import fasthead

    torch.manual_seed(0)
    weight = torch.randn(1000, 128) * 0.05  # a vocabulary that is not a multiple of the kernel's tile
    head = fasthead.ScreenedHead(weight, candidates=16)
    hidden = (torch.randn(300, 128) * 3).to(torch.bfloat16).float()
    assert torch.equal(head.argmax(hidden), (hidden @ weight.T).argmax(dim=-1))
    approx = head.approx(hidden)
    assert approx.shape == (300, 1000) and approx.dtype == torch.float32
    rel = (approx - hidden @ weight.T).norm() / (hidden @ weight.T).norm()
    assert 1e-3 < rel < 0.2  # a real 4-bit approximation, rescored exactly above
    with pytest.raises(ValueError, match="multiple of the int4 group"):
        fasthead.ScreenedHead(torch.randn(10, 100))


def test_fast_greedy_decoding_takes_the_float32_argmax_of_each_step(monkeypatch):
    """Each greedy step on the bf16 copy goes through the screened head, and the token it yields is the argmax
    of the full float32 unembedding of that step's hidden state (checked on the states the decode produced,
    so that the check does not depend on how a CPU rounds bf16 in other batch shapes)."""
    from saesteer import fasthead

    lm = make_tiny_model()
    assert fasthead.available(lm.device)
    fast = fast_model(lm)
    head = fasthead.screened_head(lm.model, lm.lm_head.weight)
    assert fasthead.screened_head(lm.model, lm.lm_head.weight) is head  # built once, with the copy
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = fasthead.ScreenedHead.argmax

    def recording(self, hidden):
        tokens = real(self, hidden)
        seen.append((hidden.detach().clone(), tokens.clone()))
        return tokens

    monkeypatch.setattr(fasthead.ScreenedHead, "argmax", recording)
    for prompt in PROMPTS:
        ids = encode_prompts(lm, [prompt, PROMPTS[0]])  # a 2-row batch (the lab's pair) with left padding
        with lm.lock:
            steps = [t.clone() for t in _decode_loop(lm, ids, max_new_tokens=10, temperature=0.0, seed=0, model=fast)]
        assert len(seen) == len(steps) and all(torch.equal(t, s) for (_, t), s in zip(seen, steps))
        for hidden, tokens in seen:
            exact = hidden.to(torch.bfloat16).float() @ lm.lm_head.weight.float().T
            assert torch.equal(tokens, exact.argmax(dim=-1))
        seen.clear()
    with lm.lock:  # sampling and the exact path keep the model's own head
        list(_decode_loop(lm, encode_prompts(lm, [PROMPTS[0]]), max_new_tokens=3, temperature=0.7, seed=0, model=fast))
        list(_decode_loop(lm, encode_prompts(lm, [PROMPTS[0]]), max_new_tokens=3, temperature=0.0, seed=0, model=lm.model))
    assert not seen


def test_sample_until_stop_refuses_features_without_an_sae(tiny_lm):
    """As generate and stream_rows do: features with no SAE to take directions from are an error, not dropped."""
    with pytest.raises(ConfigError, match="features were given without an SAE"):
        steering.sample_until_stop(tiny_lm, ["the sea"], sae=None, features=[3], strengths=torch.tensor([[4.0]]), seeds=[0],
                                   temperature=0.7, max_new_tokens=3)
    plain = steering.sample_until_stop(tiny_lm, ["the sea"], sae=None, features=[], strengths=torch.zeros(1, 0), seeds=[0],
                                       temperature=0.7, max_new_tokens=3)
    assert len(plain) == 1 and len(plain[0]) <= 3  # no features and no SAE: an unsteered sample
    assert_no_hooks(tiny_lm)


def test_sample_until_stop_refuses_a_feature_the_sae_lacks_before_decoding(tiny_lm, tiny_sae):
    """A feature id beyond the SAE's width is named with the allowed range, as generate and the CLI name it, and no
    hook is left behind."""
    width = tiny_sae.width
    with pytest.raises(Exception, match=f"feature {width} is out of range for SAE '{tiny_sae.id}': use an integer from 0 to {width - 1}"):
        steering.sample_until_stop(tiny_lm, ["the sea"], sae=tiny_sae, features=[3, width], strengths=torch.tensor([[4.0, 1.0]]),
                                   seeds=[0], temperature=0.7, max_new_tokens=3)
    assert_no_hooks(tiny_lm)
