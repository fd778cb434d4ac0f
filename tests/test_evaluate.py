"""Steering evaluation: metrics on hand-made texts, the AxBench split and strength choice, the paper's ratio
and its standard error, fast paths against obvious references (continuation NLL, residual means, batched
steering), the baselines' invariants, and the whole concept-level protocol (with resume) on the tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from saesteer.baselines import (
    LoraParams,
    add_vector,
    diffmean,
    lora_adapter,
    lora_rows,
    mention_pattern,
    mine_sentences,
    residual_mean,
    split_sentences,
)
from saesteer.config import ConfigError
from saesteer.corpus import Doc
from saesteer.evaluation import (
    EvalParams,
    best_strength,
    candidate_counts,
    concept_candidates,
    concept_mentions,
    concept_token_ids,
    continuation_nll,
    list_runs,
    load_results,
    method_table,
    paired_ratio,
    ppl_factor,
    repetition,
    run_evaluation,
    split_prefixes,
    success_at_k,
    target_strings,
)
from saesteer.judge import (
    Judge,
    harmonic_mean,
    judge_from_env,
    local_complete,
    parse_rating,
)
from saesteer.steering import capture_residuals, generate
from saesteer.testing import EVAL_DOCS as DOCS
from saesteer.testing import EVAL_PREFIXES as PREFIXES
from saesteer.testing import make_tiny_model
from test_feature_level import _tiny_bank

def assert_no_hooks(lm) -> None:
    for name, module in lm.model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'model'}"


# ---------------------------------------------------------------------------------------------------
# Metrics on hand-made texts


def test_concept_mentions_whole_words_and_plurals():
    assert concept_mentions("An apple, two Apples and a pineapple; APPLE!", "apple") == 3
    assert concept_mentions("warm wards of war and wars", "war") == 2
    assert concept_mentions("she ate ice   cream and ice", "ice cream") == 1
    assert concept_mentions("nothing here", "dog") == 0
    with pytest.raises(ConfigError):
        mention_pattern("   ")


def test_success_at_k_counts_distinct_whole_word_targets():
    targets = target_strings([" Apple", "apple", "apples", "fruit", " ,", "a", "\n", "pie"])
    assert targets == ["apple", "apples", "fruit", "pie"]  # deduplicated, punctuation and 1-char strings dropped
    assert success_at_k("Apples and fruit, fruit, fruit.", targets) == 2
    assert success_at_k("pineapple pies", targets) == 0
    assert success_at_k("", targets) == 0


def test_repetition_share_of_repeated_bigrams():
    assert repetition("the cat sat on the mat") == 0.0
    assert repetition("apple apple apple apple") == pytest.approx(1 - 1 / 3)
    assert repetition("a b a b a b") == pytest.approx(1 - 2 / 5)
    assert repetition("one") == 0.0 and repetition("") == 0.0
    assert repetition("a b c a b c", n=3) == pytest.approx(1 - 3 / 4)


def test_ppl_factor_is_one_at_reference_and_zero_at_cap():
    assert ppl_factor(2.0, 4.0) == 1.0
    assert ppl_factor(4.0, 4.0) == 1.0
    assert ppl_factor(1000.0, 4.0) == 0.0
    assert ppl_factor(5000.0, 4.0) == 0.0
    mid = math.sqrt(4.0 * 1000.0)  # halfway in log space
    assert ppl_factor(mid, 4.0) == pytest.approx(0.5)
    assert ppl_factor(math.nan, 4.0) == 0.0


# ---------------------------------------------------------------------------------------------------
# Split and strength choice


@pytest.mark.parametrize("n", [2, 5, 20, 28])
def test_split_prefixes_is_a_seeded_half_partition(n):
    train, test = split_prefixes(n, seed=3)
    assert sorted(train + test) == list(range(n))
    assert len(train) == n // 2 and len(test) == n - n // 2
    assert train == sorted(train) and test == sorted(test)
    assert (train, test) == split_prefixes(n, seed=3)


def test_split_prefixes_depends_on_seed_and_rejects_one_prefix():
    assert len({tuple(split_prefixes(20, seed=s)[0]) for s in range(6)}) > 1
    with pytest.raises(ConfigError):
        split_prefixes(1)


def test_best_strength_takes_mean_argmax_and_breaks_ties_towards_small_strength():
    frame = pd.DataFrame({
        "strength": [0.5, 0.5, 2.0, 2.0, 8.0, 8.0],
        "combined": [0.0, 1.0, 1.0, 0.2, 0.0, 0.0],
    })
    assert best_strength(frame) == 2.0  # mean 0.6 beats 0.5
    tie = pd.DataFrame({"strength": [4.0, -1.0, 1.0, 2.0], "combined": [0.5, 0.5, 0.5, 0.1]})
    assert best_strength(tie) == -1.0  # smallest |s|, then the smaller value
    nan = pd.DataFrame({"strength": [3.0, 1.0, 3.0], "combined": [np.nan, np.nan, 0.2]})
    assert best_strength(nan) == 3.0  # NaN rows ignored
    assert best_strength(pd.DataFrame({"strength": [3.0, 0.4], "combined": [np.nan, np.nan]})) == 0.4
    with pytest.raises(ValueError):
        best_strength(frame.iloc[:0])


# ---------------------------------------------------------------------------------------------------
# Concepts and feature selection


def test_concept_token_ids_single_tokens_only(tiny_lm):
    tok = tiny_lm.tokenizer
    apple = tok.convert_tokens_to_ids("apple")
    assert concept_token_ids(tok, "apple") == [apple]
    assert concept_token_ids(tok, "Apple") == [apple]  # the tiny tokenizer lower-cases
    assert concept_token_ids(tok, "zebra") == []  # <unk> never counts
    assert concept_token_ids(tok, "apple tree") == [apple]  # a phrase falls back to its first token


def _ratio_direct(y, x):
    """The paired ratio of means and its delta-method standard error, written as the textbook formula
    R · sqrt((s_y² / ȳ² + s_x² / x̄² − 2 s_xy / (x̄ ȳ)) / n), one sum at a time."""
    n = len(y)
    ybar, xbar = sum(y) / n, sum(x) / n
    syy = sum((v - ybar) ** 2 for v in y) / (n - 1)
    sxx = sum((v - xbar) ** 2 for v in x) / (n - 1)
    sxy = sum((a - ybar) * (b - xbar) for a, b in zip(y, x)) / (n - 1)
    r = ybar / xbar
    return r, r * math.sqrt((syy / ybar**2 + sxx / xbar**2 - 2 * sxy / (xbar * ybar)) / n)


def test_paired_ratio_and_its_standard_error_match_a_direct_computation():
    rng = np.random.default_rng(3)
    y, x = rng.uniform(0.1, 0.9, 12), rng.uniform(0.05, 0.5, 12)
    rows = [{"concept": f"c{i}", "method": m, "combined": v} for i in range(12) for m, v in (("sae_filtered", y[i]), ("sae_activation", x[i]))]
    rows += [{"concept": "only-filtered", "method": "sae_filtered", "combined": 1.0}, {"concept": "c0", "method": "prompt", "combined": 0.3}]
    r = paired_ratio(pd.DataFrame(rows), "sae_filtered", "sae_activation")
    want, want_se = _ratio_direct(list(y), list(x))
    assert r.n == 12  # the concept without an activation pick is left out: the ratio is paired
    assert r.ratio == pytest.approx(want) and r.se == pytest.approx(want_se)
    assert r.mean == pytest.approx(y.mean()) and r.mean_baseline == pytest.approx(x.mean())
    # The standard error is that of the ratio over concepts: a bootstrap over concepts agrees roughly.
    boot = [y[i].mean() / x[i].mean() for i in (rng.integers(0, 12, 12) for _ in range(4000))]
    assert np.std(boot) == pytest.approx(want_se, rel=0.3)
    one = paired_ratio(pd.DataFrame(rows[:2]), "sae_filtered", "sae_activation")
    assert one.n == 1 and math.isnan(one.se) and one.ratio == pytest.approx(y[0] / x[0])
    zero = pd.DataFrame([{"concept": "a", "method": "sae_filtered", "combined": 0.5}, {"concept": "a", "method": "sae_activation", "combined": 0.0}])
    assert paired_ratio(zero, "sae_filtered", "sae_activation").ratio == math.inf
    assert paired_ratio(pd.DataFrame(rows), "sae_output", "sae_activation").n == 0


def test_candidate_counts_count_concepts_by_kind():
    units = pd.DataFrame({
        "concept": ["a", "a", "b", "c", "d"], "method": ["sae_output", "prompt", "sae_output", "sae_output", "sae_output"],
        "n_input_side": [2, 2, 0, 3, 0], "n_output_side": [1, 1, 4, 0, 0], "n_filtered": [1, 1, 0, 0, 0],
    })
    assert candidate_counts(units) == {"concepts": 4, "input_side": 2, "output_side": 2, "both": 1, "filtered": 1, "none": 1}
    assert candidate_counts(units.drop(columns=["n_input_side"])) == {}  # a previous-protocol run records no kinds


# ---------------------------------------------------------------------------------------------------
# Fast paths against references


@pytest.mark.parametrize("block", [7, 100_000])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_continuation_nll_matches_full_forward_per_row(monkeypatch, softcap, block):
    """Against a full-logits forward per row and a float64 log-softmax; with vocabulary blocks of 7 rows the
    running log-sum-exp crosses many blocks."""
    import saesteer.evaluation.metrics as E

    monkeypatch.setattr(E, "VOCAB_BLOCK", block)
    lm = make_tiny_model(softcap=softcap) if softcap else make_tiny_model()
    prefixes = ["findings show that", "the king", "i once heard that the sun", "a"]
    conts = ["the apple was red", "of france", "", "dog dog dog dog dog dog dog"]
    nll, count = continuation_nll(lm, prefixes, conts, batch_size=3, chunk=5)
    for i, (p, c) in enumerate(zip(prefixes, conts)):
        pi = lm.tokenizer(p).input_ids
        ci = lm.tokenizer(c, add_special_tokens=False).input_ids if c else []
        assert count[i] == len(ci)
        if not ci:
            assert math.isnan(nll[i])
            continue
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([pi + ci])).logits[0].double()
        logp = logits.log_softmax(-1)[len(pi) - 1 : -1].gather(1, torch.tensor(ci)[:, None])[:, 0]
        assert nll[i] == pytest.approx(-float(logp.mean()), rel=1e-5, abs=1e-6)


def test_residual_mean_matches_per_text_capture(tiny_lm):
    texts = ["the apple was red", "a king", "the sun is big and the moon is small"]
    got = residual_mean(tiny_lm, 2, texts, batch_size=2)
    vecs = []
    for t in texts:
        ids = torch.tensor([tiny_lm.tokenizer(t).input_ids])  # BOS first
        with capture_residuals(tiny_lm, [2]) as store, torch.no_grad():
            tiny_lm.model(input_ids=ids)
        vecs.append(store[2][0, 1:].double())
    ref = torch.cat(vecs)
    assert got.count == ref.shape[0]
    torch.testing.assert_close(got.mean, ref.mean(0), rtol=1e-5, atol=1e-6)
    assert got.mean_norm == pytest.approx(float(ref.norm(dim=-1).mean()), rel=1e-5)


def test_diffmean_direction_and_additive_edit(tiny_lm):
    pos = residual_mean(tiny_lm, 2, ["the apple was red", "an apple tree"])
    neg = residual_mean(tiny_lm, 2, ["the city at night", "we are good"])
    dm = diffmean(pos, neg)
    assert float(dm.unit.norm()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(dm.unit * dm.raw_norm, (pos.mean - neg.mean).float(), rtol=1e-4, atol=1e-5)
    prompts = ["findings show that", "the king of france was"]
    base = generate(tiny_lm, prompts, max_new_tokens=5)
    with add_vector(tiny_lm, 2, dm.vector(1.0), torch.zeros(2)):
        assert generate(tiny_lm, prompts, max_new_tokens=5) == base  # coefficient 0 changes nothing
    with add_vector(tiny_lm, 2, dm.vector(1.0), torch.tensor([0.0, 20.0])):
        steered = generate(tiny_lm, prompts, max_new_tokens=5)
    assert steered[0] == base[0] and steered[1] != base[1]  # per-row coefficients stay on their row
    assert_no_hooks(tiny_lm)
    with pytest.raises(ConfigError), add_vector(tiny_lm, 2, dm.vector(1.0), torch.zeros(3)):
        generate(tiny_lm, prompts, max_new_tokens=2)
    assert_no_hooks(tiny_lm)


def test_lora_adapter_trains_and_leaves_the_model_unchanged():
    lm = make_tiny_model(seed=1)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    kinds = [type(m).__name__ for m in lm.model.modules()]
    ids = torch.tensor([lm.tokenizer("the apple was red and the king").input_ids])
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
    texts = ["the apple was red.", "an apple tree is big.", "i think about the apple."]
    with lora_adapter(lm, 2, texts, LoraParams(rank=2, steps=3, lr=5e-2, batch_size=2), seed=0) as report:
        with torch.no_grad():
            during = lm.model(input_ids=ids).logits
        assert len(report.losses) == 3 and all(math.isfinite(x) for x in report.losses)
        assert report.targets and all(t.startswith("model.layers.2.") for t in report.targets)
        assert report.n_params > 0
    assert not torch.allclose(during, ref)
    with torch.no_grad():
        after = lm.model(input_ids=ids).logits
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    assert [type(m).__name__ for m in lm.model.modules()] == kinds
    state = lm.model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_lora_rows_decode_as_the_peft_model_row_by_row():
    """Two adapters and an unadapted row in one batch: each row decodes what the peft model (or the plain
    model) decodes for it alone, logits equal bit for bit."""
    lm = make_tiny_model(seed=1)
    prompts = ["findings show that", "the king of france was", "i once heard that"]
    params = LoraParams(rank=2, steps=3, lr=5e-2, batch_size=2)
    solo, reports = [], []
    for i, texts in enumerate((["the apple was red.", "an apple tree is big."], ["the king ruled.", "a king and a queen."])):
        with lora_adapter(lm, 2, texts, params, seed=0) as report:
            solo.append(generate(lm, prompts[i], max_new_tokens=8)[0])
            ids = torch.tensor([lm.tokenizer(prompts[i]).input_ids])
            with torch.no_grad():
                logits = lm.model(input_ids=ids).logits
        reports.append((report, logits))
        assert set(report.weights) == set(report.targets)
    plain = generate(lm, prompts[2], max_new_tokens=8)[0]
    assert solo[0] != generate(lm, prompts[0], max_new_tokens=8)[0]  # the adapter changes the text
    with lora_rows(lm, [(reports[0][0], [0]), (reports[1][0], [1])]):
        mixed = generate(lm, prompts, max_new_tokens=8)
    assert mixed == [solo[0], solo[1], plain]
    for i in range(2):  # one row alone, logits bit for bit
        ids = torch.tensor([lm.tokenizer(prompts[i]).input_ids])
        with lora_rows(lm, [(reports[i][0], [0])]), torch.no_grad():
            torch.testing.assert_close(lm.model(input_ids=ids).logits, reports[i][1], rtol=0, atol=0)
    assert_no_hooks(lm)
    with pytest.raises(ConfigError, match="LoRA rows up to 5"), lora_rows(lm, [(reports[0][0], [5])]):
        generate(lm, prompts[:2], max_new_tokens=2)
    assert_no_hooks(lm)


def test_mine_sentences_reservoir_and_neutral_pool():
    mined = mine_sentences(["apple", "king"], DOCS, n=3, n_neutral=4, seed=0)
    assert len(mined.positive["apple"]) == 3 and len(mined.positive["king"]) == 3
    assert all(mention_pattern("apple").search(s) for s in mined.positive["apple"])
    assert all(mention_pattern("king").search(s) for s in mined.positive["king"])
    assert len(mined.neutral) == 4
    assert not any(mention_pattern(c).search(s) for s in mined.neutral for c in ("apple", "king"))
    assert mine_sentences(["apple", "king"], DOCS, n=3, n_neutral=4, seed=0) == mined
    everything = mine_sentences(["apple"], DOCS, n=100, n_neutral=100, seed=0)
    assert len(everything.positive["apple"]) == 3  # every apple sentence of 30-300 characters (";" splits one)
    assert "the apple was red." not in everything.positive["apple"]


def test_mine_sentences_finds_exactly_the_regex_matches():
    """The word-index prefilter must neither miss nor add sentences relative to mention_pattern."""
    tricky = Doc("We ate ice cream and two ice  creams at noon. An ice-cream cone was sold at the fair. "
                 "The kingdom had no ruler for many long years. Kings and queens were both present that day. "
                 "Pineapples are not what we are looking for here. APPLES are the fruit we were looking for.", "t")
    concepts = ["ice cream", "king", "apple", "France"]
    docs = [*DOCS, tricky]
    mined = mine_sentences(concepts, docs, n=1000, n_neutral=1000, seed=0)
    sentences = [x for d in docs for x in split_sentences(d.text)]
    for c in concepts:
        assert sorted(mined.positive[c]) == sorted(x for x in sentences if mention_pattern(c).search(x)), c
    assert sorted(mined.neutral) == sorted(x for x in sentences if not any(mention_pattern(c).search(x) for c in concepts))
    assert mined.n_sentences == len(sentences)


# ---------------------------------------------------------------------------------------------------
# Judge (no network: replies are given as text)


def test_judge_rating_parsing_and_harmonic_mean():
    assert parse_rating("The concept is clear.\nRating: [[2]]") == 2.0
    assert parse_rating("Rating: [[1]] ... on reflection Rating: [[0]]") == 0.0
    assert math.isnan(parse_rating("no rating here"))
    assert harmonic_mean([2.0, 2.0, 1.0]) == pytest.approx(3 / (0.5 + 0.5 + 1.0))
    assert harmonic_mean([2.0, 0.0, 2.0]) == 0.0
    assert math.isnan(harmonic_mean([2.0, math.nan, 1.0]))
    replies = {"concept": "Rating: [[2]]", "instruction": "Rating: [[1]]", "fluency": "explanation. Rating: [[2]]"}
    seen = []

    def complete(prompt: str) -> str:
        seen.append(prompt)
        key = "concept" if "[Concept Start]" in prompt else "instruction" if "[Instruction Start]" in prompt else "fluency"
        return replies[key]

    scores = Judge(complete, "hand").rate("apple", "findings show that", "apples are red")
    assert (scores.concept, scores.instruction, scores.fluency) == (2.0, 1.0, 2.0)
    assert scores.score == pytest.approx(1.5)
    assert all("apples are red" in p for p in seen) and "apple" in seen[0]
    with pytest.raises(ConfigError):
        judge_from_env({})
    with pytest.raises(ConfigError):
        judge_from_env({"SAESTEER_JUDGE_URL": "http://localhost:1/v1"})


def test_local_judge_runs_a_model_and_never_invents_ratings(tiny_lm):
    """A random tiny model writes no "Rating: [[N]]": every rating is missing (NaN), never 0."""
    reply = local_complete(tiny_lm, max_new_tokens=6)
    scores = Judge(reply, "tiny").rate("apple", "findings show that", "the apple was red")
    assert all(math.isnan(v) for v in (scores.concept, scores.instruction, scores.fluency, scores.score))


# ---------------------------------------------------------------------------------------------------
# The whole protocol on the tiny model


#: On the tiny model's feature data (12 top contexts at most): apple and king have input-side candidates
#: (two of each above tau, apple's third below), dog output-side ones only, zebra none.
TINY = EvalParams(
    strengths=(0.5, 4.0, 16.0), diffmean_coeffs=(0.5, 3.0), n_prefixes=4, max_new_tokens=6,
    n_concept_texts=4, min_concept_texts=5, n_neutral_texts=8, lora=LoraParams(rank=2, steps=2, batch_size=2),
    theta=0.5, tau=0.0138, min_contexts=5,
)
CONCEPTS = ["zebra", "apple", "dog", "king", "tree"]
N_CONCEPTS = 3  # zebra is skipped, tree is not reached


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_lm, tiny_sae):
    bank = _tiny_bank(tiny_lm, tiny_sae)
    out = tmp_path_factory.mktemp("eval")
    logs: list[str] = []
    res = run_evaluation(tiny_lm, tiny_sae, bank, CONCEPTS, out, TINY, prefixes=PREFIXES, n_concepts=N_CONCEPTS, docs=DOCS, log=logs.append)
    return res, bank, out, logs


def test_concepts_batched_together_give_each_concept_its_solo_results(tiny_run, tiny_lm, tiny_sae, tmp_path):
    """The shared fixture batches its three concepts (default concepts_per_batch=3: one decode call per phase
    for all, DiffMean rows with per-concept vectors, several filtered features per concept); run one concept at
    a time, in calls of at most 5 rows, the texts are the same and the scores equal to float rounding of the
    perplexity passes."""
    res, bank, _, _ = tiny_run
    timed = res.timings
    assert len(timed) == 1 and list(timed["concepts"].iloc[0]) == ["apple", "dog", "king"]  # one group
    solo = run_evaluation(tiny_lm, tiny_sae, bank, CONCEPTS, tmp_path, replace(TINY, concepts_per_batch=1, batch_size=5),
                          prefixes=PREFIXES, n_concepts=N_CONCEPTS, docs=DOCS)
    assert len(solo.timings) == 3
    keys = ["concept", "method", "feature", "split", "prefix_idx", "strength"]
    a = res.generations.sort_values(keys).reset_index(drop=True)
    b = solo.generations.sort_values(keys).reset_index(drop=True)
    assert a[keys + ["text", "mentions", "success_k", "n_tokens"]].equals(b[keys + ["text", "mentions", "success_k", "n_tokens"]])
    for col in ("ppl", "fluency", "combined", "concept_score"):
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-4, equal_nan=True)
    cols = ["concept", "method", "status", "feature", "best_strength", "reason", "n_input_side", "n_filtered"]
    ua = res.units.sort_values(["concept", "method"]).reset_index(drop=True)
    ub = solo.units.sort_values(["concept", "method"]).reset_index(drop=True)
    assert ua[cols].equals(ub[cols])
    assert list(ua["best_strengths"].dropna().map(list)) == list(ub["best_strengths"].dropna().map(list))


def test_protocol_rows_follow_the_split_and_the_chosen_strength(tiny_run):
    res, _, _, _ = tiny_run
    g, units = res.generations, res.units
    train, test = res.meta["train_prefixes"], res.meta["test_prefixes"]
    assert sorted(train + test) == list(range(4)) and len(train) == 2
    assert set(g["concept"]) == {"apple", "dog", "king"}  # zebra skipped, tree not reached (n_concepts=3)
    skipped = units[units["concept"] == "zebra"]
    assert (skipped["status"] == "skipped").all() and len(skipped) == len(TINY.methods)
    assert skipped["reason"].str.contains("not a single token").all()  # zebra is <unk> to the tiny tokenizer
    assert "tree" not in set(units["concept"])
    for (concept, method, feature), part in g.groupby(["concept", "method", "feature"]):
        unit = units[(units["concept"] == concept) & (units["method"] == method)].iloc[0]
        chosen = (unit["best_strengths"][list(unit["features"]).index(feature)] if method == "sae_filtered" else unit["best_strength"])
        t = part[part["split"] == "test"]
        assert sorted(t["prefix_idx"]) == test
        assert (t["strength"] == chosen).all()
        tr = part[part["split"] == "train"]
        if method.startswith("sae_") or method == "diffmean":
            grid = TINY.strengths if method != "diffmean" else TINY.diffmean_coeffs
            assert sorted(tr["strength"].unique()) == sorted(grid)
            assert set(tr["prefix_idx"]) == set(train) and len(tr) == len(grid) * len(train)
            means = tr.groupby("strength")["combined"].mean()
            assert means[chosen] == means.max()  # each filtered feature has its own strength, chosen on the train half
        elif method == "unsteered":
            assert set(tr["prefix_idx"]) == set(train)
        else:
            assert tr.empty
    assert (g["concept_score"] == (g["mentions"] > 0)).all()
    scored = g["fluency"].notna()
    assert np.allclose(g.loc[scored, "combined"], g.loc[scored, "concept_score"] * g.loc[scored, "fluency"])
    assert ((g.loc[scored, "fluency"] >= 0) & (g.loc[scored, "fluency"] <= 1)).all()
    # Perplexity is skipped only where it cannot matter: train rows without a mention (combined 0).
    unscored = g[~scored]
    assert (unscored["split"] == "train").all() and (unscored["mentions"] == 0).all() and (unscored["combined"] == 0).all()
    assert g.loc[g["split"] == "test", "fluency"].notna().all()


def test_protocol_picks_are_the_candidates_and_batched_steering_equals_single(tiny_run, tiny_lm, tiny_sae):
    res, bank, out, _ = tiny_run
    g, units = res.generations, res.units.set_index(["concept", "method"])
    for concept in ("apple", "dog", "king"):
        cc = concept_candidates(concept, concept_token_ids(tiny_lm.tokenizer, concept), bank, TINY.candidate_params())
        picks = {"sae_activation": cc.activation_pick, "sae_output": cc.output_pick, "sae_random": cc.random_pick}
        for m, pick in picks.items():
            unit = units.loc[(concept, m)]
            rows = g[(g["concept"] == concept) & (g["method"] == m)]
            if pick is None:
                assert unit["status"] == "skipped" and rows.empty
                continue
            assert unit["feature"] == pick.feature and (rows["feature"] == pick.feature).all()
            assert unit["firing_share"] == pytest.approx(pick.firing_share) and unit["output_score"] == pytest.approx(pick.output_score)
        unit = units.loc[(concept, "sae_filtered")]
        rows = g[(g["concept"] == concept) & (g["method"] == "sae_filtered")]
        assert unit["n_filtered"] == len(cc.filtered) and unit["n_input_side"] == len(cc.input_side)
        if not cc.filtered:
            assert unit["status"] == "skipped" and rows.empty
            continue
        # every input-side candidate at or above tau is evaluated, and only those
        assert list(unit["features"]) == [c.feature for c in cc.filtered] == sorted(set(rows["feature"]), key=list(unit["features"]).index)
        assert all(c.output_score >= TINY.tau for c in cc.filtered)
        assert all(c.output_score < TINY.tau for c in cc.input_side if c not in cc.filtered)
    assert len(units.loc[("apple", "sae_filtered"), "features"]) == 2 and units.loc[("apple", "sae_filtered"), "n_input_side"] == 3
    # dog has output-side candidates only: the input-side methods are skipped and say which kind is missing
    for m in ("sae_activation", "sae_filtered"):
        assert units.loc[("dog", m), "status"] == "skipped" and "no input-side candidate" in units.loc[("dog", m), "reason"]
    assert units.loc[("dog", "sae_output"), "status"] == "done"
    # The concept's sae_filtered result is the mean over its features of their own test-half means.
    summary = res.summary().set_index(["concept", "method"])
    test = g[(g["split"] == "test") & (g["method"] == "sae_filtered")]
    for concept, part in test.groupby("concept"):
        per = part.groupby("feature")["combined"].mean()
        assert summary.loc[(concept, "sae_filtered"), "combined"] == pytest.approx(per.mean())
        assert summary.loc[(concept, "sae_filtered"), "n_features"] == len(per) and summary.loc[(concept, "sae_filtered"), "feature"] == -1
    # One batched call held all methods × features × strengths; each row must equal its own single-feature generation.
    rows = g[(g["method"].isin(["sae_filtered", "sae_output", "sae_random"])) & (g["concept"] == "apple")].iloc[::4]
    for _, r in rows.iterrows():
        alone = generate(tiny_lm, [r["prompt"]], sae=tiny_sae, features=[int(r["feature"])], strengths=[r["strength"]],
                         mode="paper", max_new_tokens=TINY.max_new_tokens)[0]
        assert alone == r["text"]
    # DiffMean and prompt rows shared those calls too (zero strengths elsewhere); each equals its own call.
    texts = json.loads((out / "concept_texts.json").read_text())
    dm = diffmean(residual_mean(tiny_lm, 2, texts["concepts"]["apple"]["texts"]), residual_mean(tiny_lm, 2, texts["neutral"]))
    assert units.loc[("apple", "diffmean"), "diffmean_norm"] == pytest.approx(dm.raw_norm, rel=1e-5)
    for _, r in g[(g["method"] == "diffmean") & (g["concept"] == "apple")].iloc[::3].iterrows():
        with add_vector(tiny_lm, 2, dm.vector(1.0), torch.tensor([r["strength"]])):
            assert generate(tiny_lm, [r["prompt"]], max_new_tokens=TINY.max_new_tokens)[0] == r["text"]
    for _, r in g[g["method"].isin(["unsteered", "prompt"])].iterrows():
        assert r["text"] == generate(tiny_lm, [r["prompt"]], max_new_tokens=TINY.max_new_tokens)[0]
    prompt = g[g["method"] == "prompt"].iloc[0]
    assert prompt["prompt"] == f"Talk about {prompt['concept']}. {prompt['prefix']}"


def test_protocol_outputs_tables_figures_and_provenance(tiny_run, tiny_lm):
    res, _, out, logs = tiny_run
    assert_no_hooks(tiny_lm)  # nothing stays attached to the shared model after a whole run
    for name in ("generations.parquet", "generations.csv", "summary.csv", "methods.csv", "report.html", "concept_texts.json"):
        assert (out / name).exists(), name
    for name in ("methods", "strength_sae", "strength_diffmean", "concepts"):
        assert json.loads((out / "figures" / f"{name}.json").read_text())["data"] is not None
    table = res.methods()
    assert set(table["method"]) == set(TINY.methods)
    assert (table["n_concepts"] == 2).all()  # apple and king: dog lacks the input-side methods
    own = res.methods(common=False).set_index("method")["n_concepts"]
    assert own["sae_output"] == 3 and own["sae_activation"] == 2
    summary = res.summary()
    assert len(summary) == 3 * len(TINY.methods) - 2
    assert res.candidate_counts() == {"concepts": 4, "input_side": 2, "output_side": 3, "both": 2, "filtered": 2, "none": 1}
    ratios = res.ratios()
    assert ratios["sae_filtered"].n == 2 and ratios["sae_output"].n == 2
    assert (out / "ratios.csv").exists() and "activation pick" in (out / "report.html").read_text()
    texts = json.loads((out / "concept_texts.json").read_text())
    apple = texts["concepts"]["apple"]
    assert apple["n_corpus"] == 3 and apple["n_generated"] == 2 and len(apple["texts"]) == 5  # topped up to min 5
    # Neutral sentences mention none of the run's concepts (only 3 such sentences in DOCS, below the cap of 8).
    assert len(texts["neutral"]) == 3
    assert not any(mention_pattern(c).search(s) for s in texts["neutral"] for c in ("apple", "king", "dog", "zebra"))
    lora = res.units[(res.units["method"] == "lora") & (res.units["concept"] == "apple")].iloc[0]
    assert len(lora["lora_losses"]) == TINY.lora.steps
    assert res.meta["ppl_ref"] > 0
    assert any("zebra: skipped" in line for line in logs)
    assert list_runs([out]) == [out]


def test_list_runs_finds_the_cache_and_the_shipped_results(tiny_run, tmp_path, monkeypatch):
    import shutil

    from saesteer import evaluation as evaluate, paths

    res, _, out, _ = tiny_run
    assert res.meta["run"] == {"concepts": CONCEPTS, "n_concepts": N_CONCEPTS, "methods": list(TINY.methods)}
    assert res.meta["protocol"] == evaluate.PROTOCOL and not res.previous_protocol
    assert res.meta["finished"] and evaluate.run_progress(res, out) == evaluate.RunProgress(True, 3, 0, 1, 3, TINY.methods)
    assert paths.EVAL_RESULTS in evaluate.eval_roots() and paths.EVAL_RESULTS == paths.EVAL_ASSETS / "results"
    monkeypatch.setenv("SAESTEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "EVAL_RESULTS", tmp_path / "assets" / "eval" / "results")
    cached = evaluate.default_out_dir("tiny-gemma3", "tiny-topk-L2")
    shipped = paths.EVAL_RESULTS / "gemma-3-270m" / "L8-topk64-w4096"  # results committed for the embedded model
    for d in (cached, shipped):
        shutil.copytree(out, d)
    (paths.EVAL_RESULTS / "notes").mkdir()
    (paths.EVAL_RESULTS / "notes" / "meta.json").write_text("{}")  # no units/: not a run
    assert list_runs() == sorted([cached, shipped])
    assert cached.is_relative_to(tmp_path / "cache" / "eval")
    pd.testing.assert_frame_equal(load_results(shipped).generations, res.generations)


def test_packed_run_loads_like_the_original_and_is_listed(tiny_run, tmp_path):
    from saesteer import evaluation as evaluate

    res, _, out, _ = tiny_run
    packed = evaluate.pack_results(out, tmp_path / "packed" / "m" / "tiny")
    assert not (packed / "units").exists() and (packed / evaluate.PACKED_UNITS).is_file()
    again = load_results(packed)
    pd.testing.assert_frame_equal(again.generations, res.generations)
    pd.testing.assert_frame_equal(again.summary(), res.summary())
    pd.testing.assert_frame_equal(again.methods(), res.methods())
    lists = ("concept_token_ids", "lora_losses", "features", "best_strengths", "feature_output_scores", "feature_firing_shares")
    plain = [c for c in res.units.columns if c not in lists]

    def missing_as_none(frame: pd.DataFrame) -> pd.DataFrame:  # parquet reads a missing bool back as None, not NaN
        return frame.astype(object).where(frame.notna(), None)

    pd.testing.assert_frame_equal(missing_as_none(again.units[plain]), missing_as_none(res.units[plain]), check_dtype=False)
    for col in ("concept_token_ids", "features", "best_strengths"):
        norm = lambda v: list(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else None  # noqa: E731
        assert list(again.units[col].map(norm)) == list(res.units[col].map(norm))
    assert evaluate.run_progress(again, packed).finished
    assert list_runs([tmp_path / "packed"]) == [packed]
    with pytest.raises(ConfigError, match="no finished units"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "meta.json").write_text("{}")
        evaluate.pack_results(tmp_path / "empty", tmp_path / "x")


def test_resume_redoes_only_missing_units_and_reproduces_them(tiny_run, tiny_lm, tiny_sae, monkeypatch):
    _, bank, out, _ = tiny_run
    assert_no_hooks(tiny_lm)
    with pytest.raises(ConfigError, match="--resume"):
        run_evaluation(tiny_lm, tiny_sae, bank, ["apple"], out, TINY, prefixes=PREFIXES, docs=DOCS)
    for change in ({"max_new_tokens": 5}, {"tau": 0.5}, {"theta": 0.3}):  # candidate parameters are part of the key
        with pytest.raises(ConfigError, match="different params." + next(iter(change))):
            run_evaluation(tiny_lm, tiny_sae, bank, ["apple"], out, replace(TINY, **change), prefixes=PREFIXES, docs=DOCS, resume=True)
    original = load_results(out).generations
    # Interrupt: drop one unit's completion marker, then resume; count the generate calls the resume makes.
    victim = next((out / "units").glob("king-*__sae_filtered.json"))
    victim.unlink()
    import saesteer.steering as steering_mod

    calls = []
    real = steering_mod.generate

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(steering_mod, "generate", counting)
    resumed = run_evaluation(tiny_lm, tiny_sae, bank, CONCEPTS, out, TINY, prefixes=PREFIXES, n_concepts=N_CONCEPTS, docs=DOCS, resume=True)
    # Only king/sae_filtered was redone (its two features): one train-grid call and one test call, nothing else.
    assert calls == [len(TINY.strengths) * 2 * 2, 2 * 2]
    key = ["concept", "method", "feature", "split", "strength", "prefix_idx"]
    a = original.sort_values(key).reset_index(drop=True)
    b = resumed.generations.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["text", "combined"]], b[key + ["text", "combined"]])
    # A fully finished run resumes without any generation.
    calls.clear()
    run_evaluation(tiny_lm, tiny_sae, bank, CONCEPTS, out, TINY, prefixes=PREFIXES, n_concepts=N_CONCEPTS, docs=DOCS, resume=True)
    assert calls == []
    # Units are per method: resuming with fewer methods is allowed and runs nothing new.
    fewer = replace(TINY, methods=("sae_output", "prompt"))
    again = run_evaluation(tiny_lm, tiny_sae, bank, ["apple", "king"], out, fewer, prefixes=PREFIXES, docs=DOCS, resume=True)
    assert calls == [] and set(again.generations["method"]) == set(TINY.methods)
    assert_no_hooks(tiny_lm)


def test_resume_refuses_a_run_of_the_previous_protocol(tiny_run, tiny_lm, tiny_sae, tmp_path):
    import shutil

    _, bank, out, _ = tiny_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / "meta.json").read_text())
    meta.pop("protocol")
    meta["params"] = {k: v for k, v in meta["params"].items() if k not in ("theta", "tau", "max_contexts", "min_contexts")}
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="previous concept-level protocol .*sae_input.*choose another --out"):
        run_evaluation(tiny_lm, tiny_sae, bank, CONCEPTS, old, TINY, prefixes=PREFIXES, n_concepts=N_CONCEPTS, docs=DOCS, resume=True)
    with pytest.raises(ConfigError, match="sae_input belonged to the previous protocol"):
        replace(TINY, methods=("sae_input",))


def test_method_table_compares_methods_on_common_concepts():
    summary = pd.DataFrame({
        "concept": ["a", "a", "b", "b", "c"],
        "method": ["sae_output", "prompt", "sae_output", "prompt", "sae_output"],
        "combined": [1.0, 0.0, 0.5, 0.5, 0.0],
        "concept_score": [1.0, 0.0, 1.0, 1.0, 0.0],
        "fluency": [1.0, 1.0, 0.5, 0.5, 1.0],
    })
    t = method_table(summary).set_index("method")
    assert t.loc["sae_output", "n_concepts"] == 2  # concept c lacks the prompt baseline
    assert t.loc["sae_output", "combined"] == pytest.approx(0.75)
    assert t.loc["prompt", "combined"] == pytest.approx(0.25)
    assert t.loc["sae_output", "combined_sem"] == pytest.approx(np.std([1.0, 0.5], ddof=1) / math.sqrt(2))
    own = method_table(summary, common=False).set_index("method")
    assert own.loc["sae_output", "n_concepts"] == 3 and own.loc["sae_output", "combined"] == pytest.approx(0.5)


def test_cli_rejects_bad_arguments_with_one_line(capsys, tmp_path, monkeypatch):
    from saesteer.__main__ import main

    assert main(["eval", "--layer", "2", "--methods", "sae_output", "magic"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["eval", "--layer", "2", "--strengths", "1", "x"]) == 2
    assert "--strengths must be numbers" in capsys.readouterr().err
    assert main(["eval", "--layer", "2", "--concepts", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
    monkeypatch.delenv("SAESTEER_JUDGE_URL", raising=False)
    monkeypatch.delenv("SAESTEER_JUDGE_LOCAL", raising=False)
    assert main(["eval", "--layer", "2", "--judge"]) == 2
    assert "judge is not configured" in capsys.readouterr().err
    (tmp_path / "few.txt").write_text("a\nb\n")
    assert main(["eval", "--layer", "2", "--prefixes", str(tmp_path / "few.txt")]) == 2
    assert "--n-prefixes" in capsys.readouterr().err
    assert main(["eval", "--layer", "2", "--concepts-per-batch", "0"]) == 2
    assert "--concepts-per-batch must be at least 1, got 0" in capsys.readouterr().err
    assert main(["eval", "--layer", "2", "--theta", "2"]) == 2
    assert "theta must be in (0, 1], got 2.0" in capsys.readouterr().err
    assert main(["eval", "--layer", "2", "--tau", "x"]) == 2
    assert "--tau must be a number, got 'x'" in capsys.readouterr().err
    assert main(["eval", "--layer", "2", "--methods", "sae_input"]) == 2
    assert "previous protocol" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="concepts_per_batch must be a whole number"):
        EvalParams(concepts_per_batch=1.5)


def test_cli_runs_the_evaluation_end_to_end(tmp_path, tiny_lm, tiny_sae, capsys):
    """The CLI on a tiny model, SAE and feature data saved to disk (no network, no bundled assets)."""
    from saesteer.__main__ import main
    from saesteer.features import compute_many

    model_dir, sae_dir, feat_dir, out = tmp_path / "model", tmp_path / "sae", tmp_path / "features", tmp_path / "out"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    tiny_sae.sae.save_model(str(sae_dir))
    seqs = [tiny_lm.tokenizer(d.text).input_ids for d in DOCS] * 4
    data = compute_many(tiny_lm, [tiny_sae], corpus_sequences=seqs, n_tokens=None, cache=False, use_bundled=False, top_n=12)[0]
    data.meta["sae_id"] = "sae"  # a local SAE's id is its directory name
    data.save(feat_dir)
    (tmp_path / "concepts.txt").write_text("# a comment\nzebra\napple\n")
    (tmp_path / "prefixes.txt").write_text("\n".join(PREFIXES) + "\n")
    argv = ["eval", "--model", str(model_dir), "--device", "cpu", "--sae", str(sae_dir), "--features", str(feat_dir),
            "--concepts", str(tmp_path / "concepts.txt"), "--prefixes", str(tmp_path / "prefixes.txt"), "--n-prefixes", "4",
            "--strengths", "1,8", "--methods", "sae_output", "sae_filtered", "sae_random", "prompt", "unsteered", "--max-new-tokens", "4",
            "--n-concepts", "1", "--out", str(out), "--concepts-per-batch", "2", "--theta", "0.5", "--tau", "0.0138", "--min-contexts", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sae_output" in printed and "skipped (no candidate features): zebra" in printed and "activation pick" in printed
    res = load_results(out)
    assert set(res.generations["method"]) == {"sae_output", "sae_filtered", "sae_random", "prompt", "unsteered"}
    assert (res.meta["params"]["theta"], res.meta["params"]["tau"], res.meta["params"]["min_contexts"]) == (0.5, 0.0138, 5)
    assert res.generations.query("method == 'sae_filtered'")["feature"].nunique() == 2
    assert sorted(res.generations.query("method == 'sae_output' and split == 'train'")["strength"].unique()) == [1.0, 8.0]
    assert main(argv) == 2  # the directory holds results and --resume was not given
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
