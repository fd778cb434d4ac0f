"""Candidate selection: input-side (firing share of top contexts), output-side (logit lens) and the picks,
against a direct loop over hand-made data, and on feature data computed for the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saesteer.config import ConfigError
from saesteer.evaluation.candidates import (
    CandidateParams,
    FeatureBank,
    candidate_table,
    candidates_for,
    concept_candidates,
    concept_token_ids,
)

CONCEPT = [7, 8]  # token ids of the concept in the hand-made bank


def _bank() -> FeatureBank:
    # 6 features, 4 lens tokens, 10 contexts each (-1 = no context)
    top = np.array([[1, 2, 3, 4], [7, 1, 2, 3], [5, 6, 8, 9], [1, 1, 1, 1], [2, 7, 3, 3], [9, 9, 9, 9]])
    peak = np.array([
        [7] * 6 + [1] * 4,          # f0: share 0.6, fires on the concept
        [7] * 2 + [1] * 8,          # f1: 0.2, output side only
        [8] * 5 + [2] * 5,          # f2: 0.5 and output side
        [7] * 10,                   # f3: 1.0, lowest output score
        [1] * 10,                   # f4: 0, output side
        [7] * 9 + [-1],             # f5: 9 contexts only (too few)
    ])
    acts = np.where(peak >= 0, np.arange(1, 61, dtype=float).reshape(6, 10), np.nan)
    n_ctx = np.array([10, 10, 10, 10, 10, 9])
    out = np.array([0.2, 0.9, 0.05, 1e-5, 0.5, 0.99])
    # features deliberately not in id order: the bank sorts them
    perm = np.array([3, 0, 5, 1, 4, 2])
    feats = np.array([10, 11, 12, 13, 14, 15])
    return FeatureBank(feats[perm], top[perm], out[perm], np.linspace(0, 1, 6)[perm], np.full(6, 0.01)[perm], peak[perm], acts[perm], n_ctx[perm], "hand")


def _direct(bank: FeatureBank, ids, p: CandidateParams):
    """The definition, one feature at a time."""
    rows = []
    for i, f in enumerate(bank.features):
        ctx = [t for t in bank.peak_ids[i][: p.max_contexts] if t >= 0]
        share = sum(t in ids for t in ctx) / len(ctx) if ctx else 0.0
        fires = min(bank.n_contexts[i], p.max_contexts) >= p.min_contexts and share >= p.theta
        promotes = any(t in ids for t in bank.top_ids[i][: p.top_k])
        rows.append((int(f), share, fires, promotes, float(bank.output_score[i])))
    return rows


def test_candidates_match_the_definition_and_picks():
    bank = _bank()
    p = CandidateParams(theta=0.5, tau=0.04, top_k=4, min_contexts=10)
    cc = concept_candidates("thing", CONCEPT, bank, p)
    direct = _direct(bank, CONCEPT, p)
    assert sorted(c.feature for c in cc.input_side) == [f for f, _, fires, _, _ in direct if fires] == [10, 12, 13]
    assert sorted(c.feature for c in cc.output_side) == [f for f, _, _, pr, _ in direct if pr] == [11, 12, 14]
    shares = {f: s for f, s, *_ in direct}
    for c in cc.union:
        assert c.firing_share == pytest.approx(shares[c.feature])
        assert c.input_side == (c.feature in (10, 12, 13)) and c.output_side == (c.feature in (11, 12, 14))
    # activation pick: highest firing share (f13: 1.0) even though its output score is the lowest
    assert cc.activation_pick.feature == 13 and cc.activation_pick.firing_share == 1.0
    # output pick: highest output score over the union (f15 has 0.99 but too few contexts and no lens hit)
    assert cc.output_pick.feature == 11
    assert [c.feature for c in cc.filtered] == [10, 12]  # input side with output >= 0.04, best share first
    assert cc.random_pick.feature in {10, 11, 12, 13, 14}
    assert cc.kinds == {"input_side": 3, "output_side": 3, "both": 1, "filtered": 2}
    assert cc.picks() == {"activation_pick": 13, "output_pick": 11, "random_pick": cc.random_pick.feature}
    # ordering: input side by share, output side by output score
    assert [c.feature for c in cc.input_side] == [13, 10, 12]
    assert [c.feature for c in cc.output_side] == [11, 14, 12]
    # the random pick is seeded: same concept, same pick; the table has one row per concept
    assert concept_candidates("thing", CONCEPT, bank, p).random_pick.feature == cc.random_pick.feature
    t = candidate_table([cc])
    assert t.loc[0, "activation_pick"] == 13 and t.loc[0, "n_filtered"] == 2


def test_theta_and_context_limits():
    bank = _bank()
    low = concept_candidates("thing", CONCEPT, bank, CandidateParams(theta=0.2, top_k=4))
    assert sorted(c.feature for c in low.input_side) == [10, 11, 12, 13]
    # min_contexts 9 admits f15 (9 contexts, share 1.0); ties on share go to the higher concept activation
    loose = concept_candidates("thing", CONCEPT, bank, CandidateParams(theta=0.5, top_k=4, min_contexts=9))
    assert [c.feature for c in loose.input_side][:2] == [15, 13]
    # counting only the first 5 contexts changes f0's share to 1.0
    first5 = concept_candidates("thing", CONCEPT, bank, CandidateParams(theta=0.9, top_k=4, max_contexts=5, min_contexts=5))
    assert sorted(c.feature for c in first5.input_side) == [10, 12, 13, 15]


def test_no_tokens_no_candidates_and_bad_params():
    cc = concept_candidates("nothing", [], _bank())
    assert cc.union == () and cc.activation_pick is None and cc.output_pick is None and cc.random_pick is None
    for bad in (dict(theta=0), dict(theta=1.5), dict(tau=-1), dict(tau=math.inf), dict(top_k=0), dict(min_contexts=True)):
        with pytest.raises(ConfigError):
            CandidateParams(**bad)
    with pytest.raises(ConfigError, match="top_k"):
        concept_candidates("thing", CONCEPT, _bank(), CandidateParams(top_k=20))


def test_bank_from_tiny_feature_data(tiny_lm, tiny_sae):
    """On data computed for the tiny model: the bank's peak tokens are the contexts' max-activating tokens."""
    from test_evaluate import DOCS

    from saesteer.features import compute_many

    seqs = [tiny_lm.tokenizer(d.text).input_ids for d in DOCS] * 4
    data = compute_many(tiny_lm, [tiny_sae], corpus_sequences=seqs, n_tokens=None, cache=False, use_bundled=False, top_n=12)[0]
    bank = FeatureBank.from_feature_data(data, "tiny")
    assert list(bank.features) == sorted(data.features)
    for f in bank.features[:20]:
        ctxs = data.contexts(int(f))
        r = bank.row(int(f))
        assert [c.token_ids[c.max_pos] for c in ctxs] == [int(t) for t in bank.peak_ids[r] if t >= 0]
    items = candidates_for(["apple", "king", "zebra"], tiny_lm.tokenizer, bank, CandidateParams(theta=0.3, min_contexts=1))
    apple = items[0]
    assert apple.token_ids == tuple(concept_token_ids(tiny_lm.tokenizer, "apple"))
    ids = set(apple.token_ids)
    for c in apple.input_side:
        ctxs = data.contexts(c.feature)
        assert c.firing_share == pytest.approx(sum(x.token_ids[x.max_pos] in ids for x in ctxs) / len(ctxs))
    assert any(cc.input_side for cc in items)


def test_bank_has_exactly_its_features():
    bank = _bank()
    assert all(bank.has(int(f)) for f in bank.features) and bank.has(np.int64(bank.features[0]))
    assert not bank.has(int(bank.features.max()) + 1) and not bank.has(-1) and not bank.has("seven") and not bank.has(None)
