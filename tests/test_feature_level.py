"""The feature-level experiment: success@k against the paper's own count, the sampler against a slow loop
without KV cache, the batched runner against one feature at a time, resume, and the paper's statistics."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from saesteer.config import ConfigError
from saesteer.evaluation.candidates import FeatureBank
from saesteer.evaluation.feature_level import (
    FeatureLevelParams,
    FeatureLevelRun,
    best_amps,
    continuation_text,
    feature_summary,
    headline,
    load_feature_run,
    paper_prefixes,
    retokenize,
    row_seed,
    sample_features,
    spearman,
    success_counts,
    threshold_table,
)
from saesteer.steering import _head_logits, sample_until_stop, stop_token_ids

PREFIXES = ["findings show that", "i once heard that", "the city was"]


def paper_generation_success(sentences, prefixes, logit_lens_indices, tokenizer, k):
    """The paper's get_generation_success (src/plot.py), restated: strip the prefix, tokenise with BOS and
    drop it, count the ids among the top k (duplicates count), average over sentences."""
    total = 0
    for sentence in sentences:
        prefix = ""
        for p in prefixes:
            if sentence.startswith(p):
                prefix = p
        ids = tokenizer(sentence[len(prefix):])["input_ids"][1:]
        total += sum(1 for t in ids if t in logit_lens_indices[:k])
    return total / len(sentences)


def test_success_at_k_is_the_papers_count(tiny_lm):
    tok = tiny_lm.tokenizer
    top = [int(t) for t in tok(" apple king apple red the dog", add_special_tokens=False).input_ids]
    top = list(dict.fromkeys(top))
    conts = [" apple apple king", " the Apple red", "", " dog.", " zebra"]
    for k in (1, 2, 5, 20):
        ours = np.mean([success_counts(retokenize(tok, c), top, (k,))[k] for c in conts])
        theirs = paper_generation_success([p + c for p, c in zip(PREFIXES + PREFIXES, conts)], PREFIXES, top, tok, k)
        assert ours == pytest.approx(theirs)
    assert success_counts(retokenize(tok, " apple apple"), top, (1,))[1] == 2  # duplicates count


def _tiny_bank(lm, sae) -> FeatureBank:
    """Feature data of the tiny model computed on the evaluation's tiny corpus (top contexts included)."""
    from saesteer.features import compute_many
    from saesteer.testing import EVAL_DOCS as DOCS

    seqs = [lm.tokenizer(d.text).input_ids for d in DOCS] * 4
    data = compute_many(lm, [sae], corpus_sequences=seqs, n_tokens=None, cache=False, use_bundled=False, top_n=12)[0]
    return FeatureBank.from_feature_data(data, "tiny")


def _slow_sample(lm, sae, prompt, feature, amp, seed, temperature, max_new, stops):
    """The obvious loop: a full forward of the whole sequence per token, no KV cache. With a cache, paper mode
    edits each position once, when it is the last one of its forward (the prompt's last token, then every
    generated one); without it, the hook edits all those positions of the sequence, each by its own peak."""
    from saesteer.hookpoints import resolve_module
    from saesteer.steering import residual_edit

    ids = list(lm.tokenizer(prompt).input_ids)
    start = len(ids) - 1
    d = sae.directions([feature]).float()[0]

    def edit(x):  # (1, pos, d_model)
        x = x.clone()
        for j in range(start, x.shape[1]):
            peak = sae.sae.encode(x[:, j]).max()
            x[:, j] = x[:, j] + amp * peak * d
        return x

    g = torch.Generator().manual_seed(seed)
    out = []
    eos = {lm.tokenizer.eos_token_id}
    for _ in range(max_new):
        with residual_edit(resolve_module(lm, sae.hook_name), edit), torch.no_grad():
            hidden = lm.model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]
        logits = _head_logits(lm.model, hidden, lm.softcap)[0].double()
        p = torch.softmax(logits / temperature, -1)
        u = torch.rand(1, generator=g).double()
        tok = int(min(int(torch.searchsorted(p.cumsum(-1), u * p.sum(), right=True)), len(p) - 1))
        if tok in eos:
            break
        out.append(tok)
        ids.append(tok)
        if tok in stops:
            break
    return out


def test_sampler_matches_a_slow_loop_without_cache(tiny_lm, tiny_sae):
    stops = set(stop_token_ids(tiny_lm, "."))
    prompts = PREFIXES * 2
    feats = [3, 11]
    amps = [0.5, 8.0, 2.0, 20.0, 0.2, 4.0]
    S = torch.zeros(len(prompts), 2)
    for i in range(len(prompts)):
        S[i, i % 2] = amps[i]
    seeds = [row_seed(0, feats[i % 2], amps[i], i) for i in range(len(prompts))]
    fast = sample_until_stop(tiny_lm, prompts, sae=tiny_sae, features=feats, strengths=S, seeds=seeds, temperature=0.7,
                             max_new_tokens=10, stop_ids=sorted(stops))
    assert any(len(r) < 10 for r in fast) and any(len(r) == 10 for r in fast)  # rows left the batch early
    for i, p in enumerate(prompts):
        assert fast[i] == _slow_sample(tiny_lm, tiny_sae, p, feats[i % 2], amps[i], seeds[i], 0.7, 10, stops)
    # the "." rule: a row ends right after its first token whose text contains "."
    for r in fast:
        hits = [j for j, t in enumerate(r) if t in stops]
        assert not hits or hits[0] == len(r) - 1


TINY = FeatureLevelParams(n_features=5, amps=(0.5, 4.0, 16.0), n_prefixes=3, max_new_tokens=8, batch_size=7, features_per_unit=2)


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory, tiny_lm, tiny_sae):
    bank = _tiny_bank(tiny_lm, tiny_sae)
    out = tmp_path_factory.mktemp("flevel")
    logs = []
    run = FeatureLevelRun(tiny_lm, tiny_sae, bank, out, TINY, prefixes=PREFIXES, log=logs.append)
    seen = []
    run.run(lambda d, t: seen.append((d, t)))
    return load_feature_run(out, bank), bank, out, logs, seen


def test_batched_runner_equals_one_feature_at_a_time(tiny_features, tiny_lm, tiny_sae):
    res, bank, out, logs, seen = tiny_features
    assert res.finished and len(res.features) == 5 and seen[-1] == (5, 5) and len(logs) == 3  # 3 units of <= 2
    gens = res.generations
    assert len(gens) == 5 * 3 * 3
    stops = stop_token_ids(tiny_lm, ".")
    for r in gens.itertuples():
        alone = sample_until_stop(tiny_lm, [PREFIXES[r.prefix_idx]], sae=tiny_sae, features=[int(r.feature)], strengths=torch.tensor([[r.amp]]),
                                  seeds=[row_seed(TINY.seed, int(r.feature), r.amp, r.prefix_idx)], temperature=TINY.temperature,
                                  max_new_tokens=TINY.max_new_tokens, stop_ids=stops)[0]
        assert r.text == continuation_text(tiny_lm.tokenizer, PREFIXES[r.prefix_idx], alone)
        top = bank.top_ids[bank.row(int(r.feature))]
        s = success_counts(retokenize(tiny_lm.tokenizer, r.text), top)
        assert (r.success_1, r.success_5, r.success_20) == (s[1], s[5], s[20])
    # the best amp is the argmax of the selection score; the table reports success at it
    best = best_amps(gens)
    for row in res.features.itertuples():
        assert row.best_amp == best[row.feature]
        at = gens[(gens["feature"] == row.feature) & (gens["amp"] == row.best_amp)]
        assert row.success_20 == pytest.approx(at["success_20"].mean())
        assert at["ppl"].notna().sum() == (at["text"] != "").sum()  # every text at the chosen amp has its perplexity
    assert {"output_score", "input_score", "density", "unsteered_success_20"} <= set(res.features.columns)


def test_resume_completes_an_interrupted_run(tiny_features, tiny_lm, tiny_sae, tmp_path):
    import shutil

    res, bank, out, _, _ = tiny_features
    part = tmp_path / "part"
    shutil.copytree(out, part)
    victim = sorted((part / "units").glob("f*.json"))[-1]
    victim.unlink()  # the last unit never finished
    with pytest.raises(ConfigError, match="--resume"):
        FeatureLevelRun(tiny_lm, tiny_sae, bank, part, TINY, prefixes=PREFIXES)
    with pytest.raises(ConfigError, match="different"):
        FeatureLevelRun(tiny_lm, tiny_sae, bank, part, replace(TINY, seed=1), prefixes=PREFIXES, resume=True)
    logs = []
    FeatureLevelRun(tiny_lm, tiny_sae, bank, part, replace(TINY, batch_size=3, features_per_unit=2), prefixes=PREFIXES, resume=True, log=logs.append).run()
    assert len(logs) == 1  # only the missing unit ran again
    again = load_feature_run(part, bank)
    cols = ["feature", "amp", "prefix_idx", "text", "success_20", "best"]
    key = ["feature", "amp", "prefix_idx"]
    pd.testing.assert_frame_equal(again.generations[cols].sort_values(key).reset_index(drop=True),
                                  res.generations[cols].sort_values(key).reset_index(drop=True))


def test_resume_with_another_unit_size_skips_finished_features(tiny_features, tiny_lm, tiny_sae, tmp_path):
    """Units of one feature, stopped after two of the five planned features; resumed with units of two: the
    finished features are not run again, no generation is counted twice, and the result is the clean run's."""
    res, bank, _, _, _ = tiny_features
    out = tmp_path / "one-by-one"

    class Stop(Exception):
        pass

    def stop_after_two(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        FeatureLevelRun(tiny_lm, tiny_sae, bank, out, replace(TINY, features_per_unit=1), prefixes=PREFIXES).run(stop_after_two)
    logs, seen = [], []
    FeatureLevelRun(tiny_lm, tiny_sae, bank, out, TINY, prefixes=PREFIXES, resume=True, log=logs.append).run(
        lambda d, t: seen.append((d, t)))
    assert seen == [(2, 5), (4, 5), (5, 5)] and len(logs) == 2  # the three missing features, in units of <= 2
    again = load_feature_run(out, bank)
    key = ["feature", "amp", "prefix_idx"]
    assert not again.generations.duplicated(key).any() and len(again.generations) == len(res.generations)
    cols = [*key, "text", "success_20", "best"]
    pd.testing.assert_frame_equal(again.generations[cols].sort_values(key).reset_index(drop=True),
                                  res.generations[cols].sort_values(key).reset_index(drop=True))
    assert again.features["best_amp"].tolist() == res.features["best_amp"].tolist()


def test_a_feature_in_two_units_is_read_once(tiny_features, tmp_path):
    """A run folder where one feature's unit is there twice (as runs before per-feature resumption left it)."""
    import shutil

    res, bank, out, _, _ = tiny_features
    twice = tmp_path / "twice"
    shutil.copytree(out, twice)
    first = sorted((twice / "units").glob("f*.json"))[0]
    for suffix in (".json", ".parquet"):
        shutil.copy(first.with_suffix(suffix), (twice / "units" / "z-copy").with_suffix(suffix))
    again = load_feature_run(twice, bank)
    assert len(again.generations) == len(res.generations) and len(again.features) == len(res.features)


def test_resume_recomputes_a_missing_reference_perplexity(tiny_features, tiny_lm, tiny_sae, tmp_path):
    """A run stopped after the unsteered texts were saved but before meta.json got their median perplexity:
    the resume takes it from the saved texts (without it every fluency would be NaN)."""
    import json
    import shutil

    res, bank, out, _, _ = tiny_features
    part = tmp_path / "no-ref"
    shutil.copytree(out, part)
    meta = json.loads((part / "meta.json").read_text())
    ref = meta.pop("ppl_ref")
    assert math.isfinite(ref)
    (part / "meta.json").write_text(json.dumps(meta))
    run = FeatureLevelRun(tiny_lm, tiny_sae, bank, part, TINY, prefixes=PREFIXES, resume=True)
    run.unsteered()
    assert run.meta["ppl_ref"] == ref and json.loads((part / "meta.json").read_text())["ppl_ref"] == ref


def test_params_and_sample():
    assert len(paper_prefixes()) == 50 and paper_prefixes()[0] == "Findings show that"
    assert sample_features(4096, FeatureLevelParams()) == sample_features(4096, FeatureLevelParams())
    assert len(set(sample_features(4096, FeatureLevelParams()))) == 100
    assert sample_features(4096, FeatureLevelParams(seed=1)) != sample_features(4096, FeatureLevelParams())
    assert sample_features(10, FeatureLevelParams(features=(3, 1))) == [1, 3]
    for bad in (dict(amps=()), dict(amps=(0.0,)), dict(n_prefixes=51), dict(temperature=0), dict(select="x"), dict(n_features=0), dict(features=(1, 1))):
        with pytest.raises(ConfigError):
            FeatureLevelParams(**bad)
    with pytest.raises(ConfigError, match="out of range"):
        sample_features(10, FeatureLevelParams(features=(12,)))


def test_units_fill_one_decode_call_unless_told_otherwise():
    # 12 amps x 2 prefixes = 24 rows a feature: a 384-row call holds 16 features; one feature when a call is smaller
    assert FeatureLevelParams(n_prefixes=2).unit_size == 16
    assert FeatureLevelParams(n_prefixes=50, batch_size=100).unit_size == 1
    assert FeatureLevelParams(n_prefixes=2, features_per_unit=3).unit_size == 3
    assert "features_per_unit" not in FeatureLevelParams().key()  # a resume accepts any unit size
    with pytest.raises(ConfigError, match="features_per_unit"):
        FeatureLevelParams(features_per_unit=0)


def test_statistics_against_direct_computation():
    rng = np.random.default_rng(0)
    out = 10.0 ** rng.uniform(-9, 0, 60)
    inp = np.where(rng.random(60) < 0.7, 0.0, rng.random(60))
    succ = np.log10(out) + 9 + rng.normal(0, 1, 60)
    table = pd.DataFrame({"feature": range(60), "output_score": out, "input_score": inp, "success_1": succ / 3, "success_5": succ / 2,
                          "success_20": succ, "best_amp": rng.choice([0.2, 2.0, 20.0], 60), "fluency": 0.5})
    t = threshold_table(table, "output_score", (1e-5, 0.01))
    for row in t.itertuples():
        above, below = succ[out >= row.threshold], succ[out < row.threshold]
        assert (row.n_above, row.n_below) == (len(above), len(below))
        assert row.mean_above == pytest.approx(above.mean()) and row.mean_below == pytest.approx(below.mean())
        assert row.sem_above == pytest.approx(above.std(ddof=1) / math.sqrt(len(above)))
    # Spearman = Pearson of the ranks (no ties here)
    r, _, n = spearman(out, succ)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert n == 60 and r == pytest.approx(np.corrcoef(ranks(out), ranks(succ))[0, 1])
    s = feature_summary(table)
    assert s["rho_output_score_success_20"] == pytest.approx(r) and s["best_amp_counts"].sum() == 60
    assert s["joint"].to_numpy().sum() == 60
    assert "claim holds" in headline(s) and "not" not in headline(s).split(":")[0]
    flipped = table.assign(success_20=-succ)
    assert "does not hold (the difference goes the other way)" in headline(feature_summary(flipped))
    # a small positive gap inside the noise is not called a result
    noisy = table.assign(success_20=(np.arange(60) % 10).astype(float))  # unrelated to the (random) output scores
    h = headline(feature_summary(noisy))
    t = threshold_table(noisy, "output_score", (0.01,)).iloc[0]
    assert abs(t.mean_above - t.mean_below) < 1.96 * math.hypot(t.sem_above, t.sem_below)  # the seeded data is noise
    assert "claim holds" not in h and ("not established" in h or "does not hold" in h)


def test_best_amp_ties_go_to_the_smaller_amp():
    f = pd.DataFrame({"feature": [1] * 4 + [2] * 4, "amp": [0.2, 0.2, 4.0, 4.0] * 2, "success_20": [0, 0, 2, 1, 1, 0, 1, 0],
                      "fluency": [np.nan, np.nan, 0.5, 0.5, 0.8, np.nan, 0.8, np.nan]})
    assert best_amps(f) == {1: 4.0, 2: 0.2}
    assert best_amps(f, "success") == {1: 4.0, 2: 0.2}


def test_cli_rejects_bad_arguments_before_loading_the_model(capsys):
    from saesteer.__main__ import main

    for argv, message in (
        (["--n", "0"], "--n must be at least 1"),
        (["--prefixes", "51"], "n_prefixes must be at most 50"),
        (["--amps", "1", "x"], "--amps must be numbers"),
        (["--temperature", "hot"], "--temperature must be a number"),
        (["--feature-ids", "1,a"], "--feature-ids must be comma-separated integers"),
    ):
        assert main(["eval", "features", "--layer", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert main(["eval", "features", "--layer", "99"]) == 2  # no bundled SAE there: refused before the model loads
    assert capsys.readouterr().err.startswith("error: ")
