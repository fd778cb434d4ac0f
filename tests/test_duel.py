"""The concept duel's library: one batch of rows, clean cancellation, live restarts, concurrent sessions,
plans for every kind of concept, measures and a verdict computed from the texts."""

from __future__ import annotations

import threading

import pytest
import torch

from saesteer.testing import WORDS
from saesteer import duel
from saesteer.config import ConfigError, SteerParams
from saesteer.evaluation import CandidateParams
from saesteer.steering import generate, stream_rows

LOOSE = CandidateParams(theta=0.2, top_k=1)
"""On random tiny data few features fire mostly on one word; looser thresholds give every kind of concept."""


def kinds(lm, bank) -> dict[tuple, list[str]]:
    out: dict[tuple, list[str]] = {}
    for w in sorted({w for w in WORDS if w.isalpha()}):
        out.setdefault(tuple(sorted(duel.plan(duel.candidates(lm, bank, w, LOOSE)).features)), []).append(w)
    return out


def hooks(lm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "saesteer-stream" and t.is_alive()]


def lock_free(lm) -> bool:
    got = []
    t = threading.Thread(target=lambda: got.append(lm.lock.acquire(timeout=5)) or (got[-1] and lm.lock.release()))
    t.start()
    t.join()
    return got == [True]


def joined(it) -> list[str]:
    texts = None
    for step in it:
        texts = list(step) if texts is None else [a + b for a, b in zip(texts, step)]
    return texts


# ---------------------------------------------------------------------------------------------------
# stream_rows: one batch, each row its own


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_stream_rows_equals_generate_and_each_row_alone(word_bank, temperature):
    lm, sae, _ = word_bank
    feats = (3, 7)
    s = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    params = SteerParams(max_new_tokens=10, temperature=temperature, seed=5)
    rows = joined(stream_rows(lm, "the king said", sae=sae, features=feats, strengths=s, params=params))
    batch = generate(lm, ["the king said"] * 3, sae=sae, features=feats, strengths=s, max_new_tokens=10, temperature=temperature, seed=[5] * 3)
    alone = [generate(lm, "the king said", sae=sae, features=feats, strengths=s[i], max_new_tokens=10, temperature=temperature, seed=[5])[0] for i in range(3)]
    assert rows == batch == alone
    assert rows[1] != rows[0] or rows[2] != rows[0]  # steering changed something
    assert hooks(lm) == 0


def test_stream_rows_refuses_bad_input(word_bank):
    lm, sae, _ = word_bank
    params = SteerParams(max_new_tokens=3)
    with pytest.raises(ConfigError, match="rows, n_features"):
        stream_rows(lm, "the", sae=sae, features=(1,), strengths=torch.tensor([1.0]), params=params)
    with pytest.raises(ConfigError, match="without an SAE"):
        stream_rows(lm, "the", sae=None, features=(1,), strengths=torch.tensor([[1.0]]), params=params)
    with pytest.raises(Exception, match="out of range"):
        stream_rows(lm, "the", sae=sae, features=(10_000,), strengths=torch.tensor([[1.0]]), params=params)
    assert hooks(lm) == 0


# ---------------------------------------------------------------------------------------------------
# Plans, live restarts, two sessions


def test_plan_covers_both_one_and_no_pick(word_bank):
    lm, _, bank = word_bank
    k = kinds(lm, bank)
    both, only, none = k[("activation", "output")][0], k[("output",)][0], k[()][0]
    p = duel.plan(duel.candidates(lm, bank, both, LOOSE))
    assert p.columns == ("baseline", "activation", "output") and not p.missing
    cands = p.candidates
    assert p.features["activation"] == cands.activation_pick.feature and p.features["output"] == cands.output_pick.feature
    p = duel.plan(duel.candidates(lm, bank, only, LOOSE))
    assert p.columns == ("baseline", "output") and "fires on" in p.missing["activation"]
    p = duel.plan(duel.candidates(lm, bank, none, LOOSE))
    assert p.columns == ("baseline",) and "says" in p.missing["output"] and "fires on" in p.missing["activation"]
    p = duel.plan(duel.candidates(lm, bank, "zebra", LOOSE))  # not in the tiny vocabulary
    assert p.columns == ("baseline",) and "not one token" in p.missing["output"]


def test_strength_rows_steer_each_column_alone(word_bank):
    lm, _, bank = word_bank
    both = kinds(lm, bank)[("activation", "output")]
    p = next(duel.plan(duel.candidates(lm, bank, w, LOOSE)) for w in both if not duel.plan(duel.candidates(lm, bank, w, LOOSE)).same_feature)
    feats, s = p.strength_rows(3.0)
    assert feats == (p.features["activation"], p.features["output"])
    assert s.tolist() == [[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]


def duel_plan(word_bank):
    lm, _, bank = word_bank
    for w in kinds(lm, bank)[("activation", "output")]:
        p = duel.plan(duel.candidates(lm, bank, w, LOOSE))
        if not p.same_feature:
            return p
    raise AssertionError("the fixture has no concept with two different picks")


def test_rapid_restarts_leave_nothing_behind_and_end_like_a_fresh_run(word_bank):
    """The live slider: each release closes the running stream after a token or two and starts another."""
    lm, sae, _ = word_bank
    p = duel_plan(word_bank)
    for i, amp in enumerate([1.0, 4.0, 2.5, 8.0, 0.5, 6.0]):
        it = duel.stream_duel(lm, sae, duel.DuelParams(concept=p.candidates.concept, strength=amp, max_new_tokens=40, seed=i), p)
        for _ in range(i % 3):  # closed before the first token, after one, after two
            next(it, None)
        it.close()
        assert hooks(lm) == 0 and not stream_threads() and lock_free(lm)
    final = duel.DuelParams(concept=p.candidates.concept, strength=3.0, max_new_tokens=12, seed=2)
    texts: dict[str, str] = {}
    for step in duel.stream_duel(lm, sae, final, p):
        for c, piece in step.items():
            texts[c] = texts.get(c, "") + piece
    feats, s = p.strength_rows(3.0)
    fresh = generate(lm, [final.prompt] * 3, sae=sae, features=feats, strengths=s, max_new_tokens=12, temperature=0.7, seed=[2] * 3)
    assert [texts.get(c, "") for c in p.columns] == fresh
    assert hooks(lm) == 0 and not stream_threads() and lock_free(lm)


def test_closing_from_another_exception_mid_stream_cleans_up(word_bank):
    """Streamlit stops a script that the user re-ran by raising inside it; the stream must close with it."""
    lm, sae, _ = word_bank
    p = duel_plan(word_bank)

    class Rerun(Exception):
        pass

    from contextlib import closing

    with pytest.raises(Rerun):
        with closing(duel.stream_duel(lm, sae, duel.DuelParams(concept="x", strength=2.0, max_new_tokens=50), p)) as it:
            for n, _ in enumerate(it):
                if n == 2:
                    raise Rerun
    assert hooks(lm) == 0 and not stream_threads() and lock_free(lm)


def test_two_sessions_duelling_at_once_get_their_solo_outputs(word_bank):
    lm, sae, _ = word_bank
    p = duel_plan(word_bank)
    settings = [duel.DuelParams(concept="a", strength=2.0, seed=1, max_new_tokens=12), duel.DuelParams(concept="a", strength=7.0, seed=9, max_new_tokens=12)]

    def run(params):
        out: dict[str, str] = {}
        for step in duel.stream_duel(lm, sae, params, p):
            for c, piece in step.items():
                out[c] = out.get(c, "") + piece
        return out

    solo = [run(s) for s in settings]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def session(i):
        barrier.wait()
        results[i] = run(settings[i])

    threads = [threading.Thread(target=session, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo
    assert solo[0] != solo[1]
    assert hooks(lm) == 0 and not stream_threads()


def test_strip_rows_equal_each_strength_alone(word_bank):
    lm, sae, _ = word_bank
    p = duel_plan(word_bank)
    params = duel.DuelParams(concept="a", strength=2.0, seed=3)
    amps = duel.strip_strengths(2.0)
    assert 4 <= len(amps) <= 6 and 2.0 in amps and all(0 < a <= duel.MAX_AMP for a in amps)
    texts: dict = {}
    for step in duel.stream_strip(lm, sae, params, p, amps, max_new_tokens=6):
        for cell, piece in step.items():
            texts[cell] = texts.get(cell, "") + piece
    f = p.features["output"]
    for a in amps:
        alone = generate(lm, params.prompt, sae=sae, features=[f], strengths=[a], max_new_tokens=6, temperature=0.7, seed=[3])[0]
        assert texts.get(("output", a), "") == alone


# ---------------------------------------------------------------------------------------------------
# Parameters, measures and the verdict


def test_duel_params_refuse_bad_input():
    for bad, match in [({"concept": " "}, "empty"), ({"concept": "x" * 65}, "at most 64"), ({"strength": float("nan")}, "strength"),
                       ({"strength": -1.0}, "strength"), ({"strength": 21.0}, "strength"), ({"seed": -1}, "seed"),
                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": 9.0}, "temperature")]:
        with pytest.raises(ConfigError, match=match):
            duel.DuelParams(**{"concept": "water", "strength": 2.0, **bad})


def test_hits_and_live_fluency():
    assert duel.hits("Water, waters and WATER; underwater.", "water") == 3
    assert duel.live_fluency("the sea the sea the sea") == pytest.approx(2 / 5)  # 5 bigrams, 2 distinct: repetition 0.6


def stats(col, hits, fluency):
    return duel.ColumnStats(col, "", hits, 0.0, 5.0, fluency)


def test_verdict_is_computed_from_the_numbers(word_bank):
    lm, _, bank = word_bank
    p = duel_plan(word_bank)
    c = p.candidates.concept
    win = duel.verdict(p, {"baseline": stats("baseline", 0, 1), "activation": stats("activation", 0, 0.9), "output": stats("output", 3, 0.8)}, 2.0)
    assert "What says it steers" in win and "3 times" in win and "never said" in win
    lose = duel.verdict(p, {"baseline": stats("baseline", 0, 1), "activation": stats("activation", 2, 0.9), "output": stats("output", 0, 0.9)}, 2.0)
    assert "other way" in lose and "twice" in lose
    broke = duel.verdict(p, {"baseline": stats("baseline", 0, 1), "activation": stats("activation", 0, 0.9), "output": stats("output", 5, 0.1)}, 9.0)
    assert "broke down" in broke and "lower the strength" in broke
    neither = duel.verdict(p, {"baseline": stats("baseline", 0, 1), "activation": stats("activation", 0, 0.9), "output": stats("output", 0, 0.9)}, 1.0)
    assert "Neither" in neither and f"“{c}”" in neither
    only = duel.plan(duel.candidates(lm, bank, kinds(lm, bank)[("output",)][0], LOOSE))
    assert "Only the output pick" in duel.verdict(only, {"baseline": stats("baseline", 0, 1), "output": stats("output", 1, 0.9)}, 2.0)
    none = duel.plan(duel.candidates(lm, bank, "zebra", LOOSE))
    assert "No feature" in duel.verdict(none, {"baseline": stats("baseline", 0, 1)}, 2.0)


def test_score_uses_the_baseline_as_reference(word_bank):
    lm, _, _ = word_bank
    texts = {"baseline": " the king said the queen", "output": " water water water water water", "activation": ""}
    out = duel.score(lm, "the", "water", texts)
    assert out["baseline"].fluency == pytest.approx(1 - out["baseline"].repetition)  # its own reference: ppl factor 1
    assert out["output"].hits == 5 and out["output"].repetition == pytest.approx(0.75)
    assert out["activation"].fluency == 0.0 and out["activation"].hits == 0
