"""Fluent defaults: presets and default strengths picked by code from evaluation results (fresh vs stale runs),
the calibration fallback, and, on the real embedded model, that the presets say their word without looping."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from saesteer.testing import WORDS
from saesteer import presets, steering
from saesteer.config import LIVE_NEW_TOKENS, PAPER_TEMPERATURE
from saesteer.evaluation import FeatureBank, repetition
from saesteer.steering import default_fast, generate


def word_features(lm, bank) -> list[tuple[int, str]]:
    out = []
    for f in bank.features:
        w = presets.top_word(lm.tokenizer.convert_ids_to_tokens(int(bank.top_ids[bank.row(int(f)), 0])))
        if w is not None:
            out.append((int(f), w))
    return out


def write_run(root, lm, sae, rows: list[dict], train: list[dict], fresh: bool = True):
    from saesteer.store import model_fingerprint, sae_fingerprint

    run = root / "gemma" / sae.id
    run.mkdir(parents=True)
    meta = {"sae_id": sae.id, "model_fingerprint": model_fingerprint(lm), "sae_fingerprint": sae_fingerprint(sae) if fresh else "old"}
    (run / "meta.json").write_text(json.dumps(meta))
    pd.DataFrame(rows).to_csv(run / "summary.csv", index=False)
    pd.DataFrame(train).to_parquet(run / "generations.parquet")
    return run


def summary_row(concept, method, feature, strength, concept_score, combined=0.5, fluency=0.8):
    return {"concept": concept, "method": method, "feature": feature, "strength": strength, "concept_score": concept_score,
            "combined": combined, "fluency": fluency}


def test_top_word_is_a_word_of_four_latin_letters():
    assert presets.top_word("▁Ocean") == "ocean" and presets.top_word(" water") == "water"
    for token in ("est", " 1234", "وسهلا", "ab-c", " ", "lijk."):
        assert presets.top_word(token) is None, token
    assert presets.mentions_word("Oceans and the ocean, OCEAN!", "ocean") == 2


def test_fresh_results_give_presets_where_the_output_pick_beat_the_unsteered_model(word_bank, tmp_path):
    lm, sae, bank = word_bank
    (f1, w1), (f2, w2), (f3, w3), (f4, w4) = word_features(lm, bank)[:4]
    rows = [
        summary_row("delta", "sae_output", f4, 8.0, 1.0, combined=0.9, fluency=0.2), summary_row("delta", "unsteered", -1, 0.0, 0.0),  # broken text: not a preset
        summary_row("alpha", "sae_output", f1, 3.0, 0.6, combined=0.5), summary_row("alpha", "unsteered", -1, 0.0, 0.1),
        summary_row("beta", "sae_output", f2, 1.2, 0.9, combined=0.7), summary_row("beta", "unsteered", -1, 0.0, 0.0),
        summary_row("gamma", "sae_output", f3, 4.0, 0.2), summary_row("gamma", "unsteered", -1, 0.0, 0.3),  # no gain: not a preset
    ]
    train = [{"concept": c, "method": "sae_output", "strength": s, "split": "train", "combined": v}
             for c in ("alpha", "beta") for s, v in ((1.2, 0.2), (2.0, 0.6), (4.0, 0.4))]
    train.append({"concept": "alpha", "method": "sae_input", "strength": 8.0, "split": "train", "combined": 0.9})  # another method
    run = write_run(tmp_path, lm, sae, rows, train)
    d = presets.defaults(lm, sae, bank, roots=[tmp_path])
    assert d.source == "evaluation" and d.run == run
    assert d.strength == 2.0  # the output pick's best amp over its train rows, all concepts pooled
    assert [(p.concept, p.feature, p.strength) for p in d.presets] == [("beta", f2, 1.2), ("alpha", f1, 3.0)]
    assert "90%" in d.presets[0].evidence and "unsteered: 0%" in d.presets[0].evidence
    assert presets.feature_strength(lm, sae, d, f3, bank) == (2.0, d.reason)  # any feature: the layer's evaluated amp


def fixture_concepts() -> list[str]:
    """Concepts the tiny fixture's vocabulary holds (the shipped concept list is not in it)."""
    return [w for w in sorted(set(WORDS)) if len(w) >= 4 and w.isalpha()]


def test_stale_or_absent_results_fall_back_to_calibration_and_say_why(word_bank, tmp_path, monkeypatch):
    lm, sae, bank = word_bank
    monkeypatch.setattr(presets, "default_concepts", fixture_concepts)
    d = presets.defaults(lm, sae, bank, roots=[tmp_path])
    assert d.source == "calibration" and d.strength is None and "no evaluation" in d.reason
    f, _ = word_features(lm, bank)[0]
    write_run(tmp_path, lm, sae, [summary_row("alpha", "sae_output", f, 3.0, 0.6), summary_row("alpha", "unsteered", -1, 0.0, 0.0)],
              [{"concept": "alpha", "method": "sae_output", "strength": 3.0, "split": "train", "combined": 0.5}], fresh=False)
    d = presets.defaults(lm, sae, bank, roots=[tmp_path])
    assert d.source == "calibration" and "other weights" in d.reason
    assert d.presets == presets.fallback_presets(bank, lm.tokenizer, fixture_concepts()) and d.presets
    for p in d.presets:  # fallback presets: the concept's output pick, whose top lens word is the concept itself
        assert p.strength is None and presets.top_word(p.word) == p.word
        assert p.word.rstrip("s") == p.concept.lower().rstrip("s") or p.word.startswith(p.concept.lower())


def test_fallback_presets_are_concepts_whose_output_pick_says_them(word_bank):
    lm, _, bank = word_bank
    concepts = fixture_concepts()
    from saesteer.evaluation import candidates_for

    by = {c.concept: c for c in candidates_for(concepts, lm.tokenizer, bank)}

    def top(c: str) -> str | None:
        return presets.top_word(lm.tokenizer.convert_ids_to_tokens(int(bank.top_ids[bank.row(by[c].output_pick.feature), 0])))

    # The obvious version: concepts whose output pick's top word is the concept, by output score (ties by name),
    # each word and each feature once, the first n.
    own = sorted((c for c in concepts if by[c].output_pick is not None and top(c) == c),
                 key=lambda c: (-by[c].output_pick.output_score, c))
    assert own, "the fixture has no concept whose output pick says it"
    for n in (1, 3, 10):
        expect, features = [], set()
        for c in own:
            if by[c].output_pick.feature not in features and len(expect) < n:
                expect.append(c)
                features.add(by[c].output_pick.feature)
        got = presets.fallback_presets(bank, lm.tokenizer, concepts, n=n)
        assert [p.concept for p in got] == expect
        assert all(by[p.concept].output_pick.feature == p.feature and p.word == p.concept for p in got)


def scripted_calibration(monkeypatch, screen: dict[int, list[str]], lab: dict[float, list[bool]], fluency: dict[str, float] | None = None):
    """Replace the model in :func:`presets._measure`: ``screen[seed]`` is the screening batch's texts (unsteered,
    then one per grid amp), ``lab[amp]`` whether each seed's lab-shape sample meets the target. Returns the
    list of screening seeds and lab amps asked for, in order."""
    from types import SimpleNamespace

    asked = []

    def fake_generate(lm, prompts, *, seed, **kw):
        asked.append(("screen", seed[0]))
        return screen[seed[0]]

    def fake_score(lm, prompt, word, texts):
        return {k: SimpleNamespace(fluency=(fluency or {}).get(t, 0.9), repetition=repetition(t)) for k, t in texts.items()}

    def fake_lab(lm, sae, feature, word, amp, *, seeds, need=None, **kw):
        asked.append(("lab", amp))
        return [presets.Sample(sd, "", "x", int(ok), 0, 0.0, 0.9 if ok else 0.1) for sd, ok in zip(seeds, lab[amp])]

    monkeypatch.setattr(presets, "generate", fake_generate)
    monkeypatch.setattr(presets, "score", fake_score)
    monkeypatch.setattr(presets, "lab_samples", fake_lab)
    return asked


def test_calibration_takes_the_smallest_amp_that_most_seeds_say_fluently_as_the_lab_shows_it(monkeypatch):
    grid = (1.0, 2.0, 3.0, 6.0)
    base = "the sea is calm today"
    screen = {  # seed -> unsteered, amp 1, 2, 3, 6
        0: [base, "the sea", "an ocean storm", "the ocean is deep", "ocean waves and more ocean"],
        1: [base, "the sea", "a calm bay", "ocean liners sail", "the ocean floor"],
        2: [base, "the sea", "a calm bay", "the harbour", "an ocean view"],
    }
    asked = scripted_calibration(monkeypatch, screen, {3.0: [True, False, False], 6.0: [True, True, False]})
    c = presets._measure(None, None, 5, "ocean", "p", 0, grid, 8, True)
    # amp 2 said it for one seed only (luck); amp 3 passed the screen (2 seeds) but not the lab's shape; amp 6 did both
    assert c.n_ok == {1.0: 0, 2.0: 1, 3.0: 2, 6.0: 3}
    assert c.ok and c.strength == 6.0 and c.verified == {3.0: 1, 6.0: 2}
    assert asked == [("screen", 0), ("screen", 1), ("screen", 2), ("lab", 3.0), ("lab", 6.0)]
    assert "amp 6" in c.describe() and "2 of 3 samples, the default seed's among them, as the lab decodes them" in c.describe()
    assert c.texts[2.0] == "an ocean storm" and len(c.samples) == 3
    # 2 of 3 is not enough when the pages' default seed (the first) is the one that fails
    scripted_calibration(monkeypatch, screen, {3.0: [False, True, True], 6.0: [False, True, True]})
    c = presets._measure(None, None, 5, "ocean", "p", 0, grid, 8, True)
    assert not c.ok and c.verified == {3.0: 2, 6.0: 2}


def test_calibration_counts_only_what_steering_caused_and_stops_when_the_answer_is_known(monkeypatch):
    grid = (1.0, 2.0)
    said = "the ocean again"
    # the unsteered text of seeds 0 and 1 says the word already: those samples do not count, and after two seeds
    # no amp can reach 2 of 3 any more, so the third seed is not sampled and nothing is checked in the lab's shape
    screen = {0: [said, said, said], 1: ["an ocean", said, said], 2: ["calm", said, said]}
    asked = scripted_calibration(monkeypatch, screen, {})
    c = presets._measure(None, None, 5, "ocean", "p", 0, grid, 8, True)
    assert not c.ok and c.strength == presets.FALLBACK_STRENGTH and c.n_ok == {1.0: 0, 2.0: 0}
    assert asked == [("screen", 0), ("screen", 1)] and "no amp" in c.describe()
    # fluency below the duel's FLUENT does not count either
    asked = scripted_calibration(monkeypatch, {0: ["calm", said, said], 1: ["calm", said, said], 2: ["calm", said, said]},
                                 {1.0: [True, True, True]}, fluency={said: 0.2})
    c = presets._measure(None, None, 5, "ocean", "p", 0, grid, 8, True)
    assert not c.ok and c.n_ok == {1.0: 0, 2.0: 0} and ("lab", 1.0) not in asked


def test_a_sample_meets_the_target_only_when_steering_said_the_word_without_looping():
    ok = presets.Sample(0, "calm", "the ocean", 1, 0, 0.1, 0.8)
    assert ok.ok and "says it 1×" in ok.line()
    assert not presets.Sample(0, "an ocean", "the ocean", 1, 1, 0.1, 0.8).ok  # the unsteered text says it too
    assert not presets.Sample(0, "calm", "calm", 0, 0, 0.1, 0.8).ok
    assert not presets.Sample(0, "calm", "ocean ocean", 2, 0, 0.6, 0.8).ok  # loops
    assert not presets.Sample(0, "calm", "the ocean", 1, 0, 0.1, 0.4).ok  # not fluent


def test_lab_samples_are_the_labs_own_two_row_batches(word_bank):
    """Each sample is what ``stream_pair`` streams in the lab at that seed (baseline and steered of one 2-row batch)."""
    from saesteer.config import SteerParams
    from saesteer.steering import stream_pair

    lm, sae, bank = word_bank
    (f, w), = word_features(lm, bank)[:1]
    got = presets.lab_samples(lm, sae, f, w, 3.0, seeds=(0, 1), max_new_tokens=6)
    for x in got:
        params = SteerParams(features=(f,), strengths=(3.0,), max_new_tokens=6, temperature=PAPER_TEMPERATURE, seed=x.seed)
        pieces = list(stream_pair(lm, presets.NEUTRAL_PROMPT, sae=sae, params=params, fast=default_fast(lm)))
        assert (x.baseline, x.text) == ("".join(a for a, _ in pieces), "".join(b for _, b in pieces))
        assert x.mentions == presets.mentions_word(x.text, w) and x.repetition == repetition(x.text)


def test_calibration_fluency_is_the_duels_figure(word_bank):
    """What calibration calls fluent is what the duel's column shows (duel.score against the unsteered row)."""
    from saesteer import duel

    lm, sae, bank = word_bank
    presets.clear_cache()
    (f, w), = word_features(lm, bank)[:1]
    cal = presets.calibrate(lm, sae, [f], [w])[0]
    base = generate(lm, presets.NEUTRAL_PROMPT, max_new_tokens=presets.CALIBRATION_TOKENS, temperature=0.7, seed=[0], fast=default_fast(lm))[0]
    cols = {"baseline": base, **{str(a): t for a, t in cal.texts.items()}}
    stats = duel.score(lm, presets.NEUTRAL_PROMPT, w, cols)
    for a in cal.texts:
        assert cal.fluency[a] == pytest.approx(stats[str(a)].fluency, abs=1e-6)


def test_calibrate_runs_one_batch_and_caches(word_bank, monkeypatch):
    lm, sae, bank = word_bank
    presets.clear_cache()
    calls = []
    real = presets.generate

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(presets, "generate", counting)
    (f1, w1), (f2, w2) = word_features(lm, bank)[:2]
    first = presets.calibrate(lm, sae, [f1, f2], [w1, w2])
    rows = 1 + len(presets.CALIBRATION_GRID)  # the unsteered row, then each amp: one batch per feature and seed
    k = len(presets.CALIBRATION_SEEDS)
    # per feature 2 (no amp can pass any more) to k screening batches
    assert all(c == rows for c in calls) and 2 * 2 <= len(calls) <= 2 * k and rows <= steering.FAST_MAX_BATCH
    assert set(first[0].texts) == set(presets.CALIBRATION_GRID) and first[0].n_seeds == k
    n = len(calls)
    again = presets.calibrate(lm, sae, [f2], [w2])
    assert len(calls) == n and again[0] == first[1]
    # each grid row is what that amp gives alone (one seed per row), on the path the pages start with
    alone = real(lm, presets.NEUTRAL_PROMPT, sae=sae, features=[f1], strengths=[3.0], max_new_tokens=presets.CALIBRATION_TOKENS,
                 temperature=0.7, seed=[0], fast=default_fast(lm))[0]
    assert first[0].texts[3.0] == alone
    with pytest.raises(Exception, match="one word per feature"):
        presets.calibrate(lm, sae, [f1], [])


# ---------------------------------------------------------------------------------------------------
# The real embedded model


def test_calibration_measures_the_path_the_pages_start_with(word_bank, monkeypatch):
    """The duel and the lab start at the paper's temperature, LIVE_NEW_TOKENS new tokens and ``default_fast``
    (the bf16 copy on a CPU): the calibration generates exactly so, and an explicit ``fast`` is its own entry."""
    lm, sae, bank = word_bank
    presets.clear_cache()
    seen = []
    real = presets.generate

    def recording(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("max_new_tokens", "temperature", "fast")})
        return real(*args, **kwargs)

    monkeypatch.setattr(presets, "generate", recording)
    (f, w), = word_features(lm, bank)[:1]
    presets.calibrate(lm, sae, [f], [w])
    k = len(seen)
    assert 2 <= k <= len(presets.CALIBRATION_SEEDS)
    assert seen == [{"max_new_tokens": LIVE_NEW_TOKENS, "temperature": PAPER_TEMPERATURE, "fast": default_fast(lm)}] * k
    assert default_fast(lm) is True  # the tiny model is on the CPU: the copy is what the pages start with
    presets.calibrate(lm, sae, [f], [w], fast=False)
    assert seen[-1]["fast"] is False and len(seen) > k


def test_run_metas_are_the_run_folders_find_run_reads(word_bank, tmp_path):
    lm, sae, bank = word_bank
    f, _ = word_features(lm, bank)[0]
    run = write_run(tmp_path, lm, sae, [summary_row("alpha", "sae_output", f, 3.0, 0.6), summary_row("alpha", "unsteered", -1, 0.0, 0.0)],
                    [{"concept": "alpha", "method": "sae_output", "strength": 3.0, "split": "train", "combined": 0.5}])
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "meta.json").write_text("{}")
    deep = run / "figures" / "extra"
    deep.mkdir(parents=True)
    (deep / "meta.json").write_text("{}")  # not a run folder: neither read by find_run nor watched by the app
    assert presets.run_metas([tmp_path]) == [run / "meta.json", tmp_path / "flat" / "meta.json"]
    assert presets.find_run(lm, sae, [tmp_path])[0] == run


@pytest.mark.slow
def test_presets_and_the_lab_default_say_their_word_or_say_that_they_cannot():
    """Issue 12's last target, measured honestly on the real embedded model at every bundled layer: the lab's
    default feature and every demo preset, at their default strength, as the lab shows them (neutral prompt,
    temperature 0.7, 32 new tokens, the bf16 copy on a CPU, baseline + steered in one 2-row batch), mention the
    feature's top word where the unsteered text does not, with word-bigram repetition <= 0.5 and the duel's
    fluency >= 0.5, in most of the seeds, the pages' default seed 0 among them. The presets come from the shipped preset search of these very
    weights; at a layer where it found none, the page offers none and the lab's default feature says that no
    amp worked (the README lists the layers)."""
    from saesteer.config import SaeSpec
    from saesteer.features import FeatureData
    from saesteer.models import load_model
    from saesteer.paths import bundled_feature_dir
    from saesteer.saes import list_bundled, load_sae
    from saesteer.ui.tables import demo_features

    lm = load_model()
    bundled = list_bundled()
    opens = presets.opening_sae(lm.name, [e["id"] for e in bundled])
    assert opens is not None, "no bundled layer has a preset: the app would open on none"
    problems, counts = [], {}
    for e in bundled:
        sae = load_sae(SaeSpec(source="bundled", layer=e["layer"]), lm)
        data = FeatureData.load(bundled_feature_dir(lm.name, sae.id))
        bank = FeatureBank.from_feature_data(data)
        d = presets.defaults(lm, sae, bank)
        assert d.source == "search", f"L{sae.layer}: the shipped preset search does not match these weights ({d.reason}): run `python -m saesteer presets`"
        counts[sae.id] = len(d.presets)
        for p in d.presets:  # presets[0] is also the lab's default feature
            amp, why = presets.preset_strength(lm, sae, p)
            got = presets.lab_samples(lm, sae, p.feature, p.word, amp)
            if not presets.passes(got, presets.MIN_SEEDS_OK):
                problems.append(f"L{sae.layer} preset {p.concept!r} (f{p.feature}, amp {amp:g}): " + " | ".join(f"{x.line()}: {x.text!r}" for x in got))
        if not d.presets:  # the lab starts on the word-led feature of the highest output score: it must say it cannot
            f = int(demo_features(data.table, n=1)["feature"].iloc[0])
            amp, why = presets.feature_strength(lm, sae, d, f, bank)
            cal = presets.calibrate(lm, sae, [f], [presets._word_of(bank, lm.tokenizer, f)])[0]
            if cal.ok:
                got = presets.lab_samples(lm, sae, f, cal.word, amp)
                if not presets.passes(got, presets.MIN_SEEDS_OK):
                    problems.append(f"L{sae.layer} lab default f{f} (amp {amp:g}): " + " | ".join(x.line() for x in got))
            elif not (amp == presets.FALLBACK_STRENGTH and "no amp" in why):
                problems.append(f"L{sae.layer} lab default f{f}: no amp worked, yet the page says {why!r}")
    assert not problems, "\n".join(problems)
    assert counts[opens] == max(counts.values()) > 0


# ---------------------------------------------------------------------------------------------------
# The preset search and its file


def fake_calibrations(monkeypatch, passing: dict[int, float]):
    """calibrate() without the model: the features in ``passing`` meet the target at their amp, others at none."""
    asked = []

    def fake(lm, sae, features, words, **kw):
        out = []
        for f, w in zip(features, words):
            asked.append(int(f))
            amp = passing.get(int(f))
            sample = presets.Sample(0, "calm", f"a {w}", 1, 0, 0.0, 0.9)
            out.append(presets.Calibration(int(f), w, amp or presets.FALLBACK_STRENGTH, amp is not None, {1.0: "x"}, {1.0: 0.9},
                                           {1.0: 3 if amp else 0}, 3, {amp: 3} if amp else {}, (sample,) if amp else ()))
        return out

    monkeypatch.setattr(presets, "calibrate", fake)
    return asked


def test_search_candidates_are_output_picks_that_say_their_own_concept(word_bank):
    lm, _, bank = word_bank
    from saesteer.evaluation import candidates_for

    concepts = fixture_concepts()[:6]
    got = presets.search_candidates(bank, lm.tokenizer, concepts)
    assert got, "the fixture has no concept whose output pick says it"
    by = {c.concept: c for c in candidates_for([g[0] for g in got], lm.tokenizer, bank)}
    for concept, f, w, score in got:
        assert by[concept].output_pick.feature == f and score == pytest.approx(by[concept].output_pick.output_score)
        assert w == presets.top_word(lm.tokenizer.convert_ids_to_tokens(int(bank.top_ids[bank.row(f), 0])))
    assert len({g[1] for g in got}) == len(got) and len({g[2] for g in got}) == len(got)  # one per feature and per word
    listed = [g for g in got if g[0] in concepts]
    assert got[:len(listed)] == listed  # the concept list first, each group by output score
    assert [g[3] for g in listed] == sorted((g[3] for g in listed), reverse=True)


def test_search_stops_at_n_presets_checkpoints_each_candidate_and_resumes(word_bank, monkeypatch, tmp_path):
    lm, sae, bank = word_bank
    cands = presets.search_candidates(bank, lm.tokenizer, fixture_concepts())
    assert len(cands) >= 2
    asked = fake_calibrations(monkeypatch, {cands[1][1]: 1.5})
    points = []
    res = presets.search(lm, sae, bank, concepts=fixture_concepts(), n=1, checkpoint=points.append)
    assert asked == [c[1] for c in cands[:2]] and res.done and len(points) == 2 and not points[-1].done
    assert [(p.concept, p.feature, p.strength) for p in res.presets] == [(cands[1][0], cands[1][1], 1.5)]
    assert "in 3 of 3 samples of the lab" in res.presets[0].evidence and "1 of the 2 candidates" in res.summary()
    # with one preset found, the search stops: nothing after it is calibrated
    asked.clear()
    assert presets.search(lm, sae, bank, concepts=fixture_concepts(), n=1, resume=res).tried == res.tried and asked == []
    # a search interrupted after the first candidate goes on with the second
    again = presets.search(lm, sae, bank, concepts=fixture_concepts(), n=1, resume=points[0])
    assert asked == [cands[1][1]] and again.presets == res.presets
    # ... but not from another SAE's (or another setting's) search
    other = presets.Search(lm.name, sae.id, "m", "other", res.setting, res.tried, res.n_candidates)
    asked.clear()
    presets.search(lm, sae, bank, concepts=fixture_concepts(), n=1, resume=other)
    assert asked == [c[1] for c in cands[:2]]
    # tries bounds the work when too few pass
    asked.clear()
    few = presets.search(lm, sae, bank, concepts=fixture_concepts(), tries=1)
    assert asked == [cands[0][1]] and few.presets == () and few.goes_on(2) and not few.goes_on(1)


def test_the_search_file_round_trips_and_is_read_only_for_its_weights_and_setting(word_bank, monkeypatch, tmp_path):
    lm, sae, bank = word_bank
    cands = presets.search_candidates(bank, lm.tokenizer, fixture_concepts())
    fake_calibrations(monkeypatch, {cands[0][1]: 2.0})
    res = presets.search(lm, sae, bank, concepts=fixture_concepts(), tries=2)
    path = presets.write_search(res, tmp_path)
    assert path == tmp_path / lm.name / f"{sae.id}.json" and presets.read_search(path) == res
    assert presets.load_search(lm, sae, [tmp_path]) == res
    d = presets.defaults(lm, sae, bank, roots=[tmp_path / "no-eval"], preset_roots=[tmp_path])
    assert d.source == "search" and d.presets == res.presets and d.strength is None and "1 of the 2 candidates" in d.reason
    for change in ({"sae_fingerprint": "x"}, {"model_fingerprint": "x"}, {"setting": {**res.setting, "max_new_tokens": 8}}, {"done": False}):
        presets.write_search(presets.Search(**{**vars(res), **change}), tmp_path)
        assert presets.load_search(lm, sae, [tmp_path]) is None, change
    path.write_text("{not json")
    assert presets.read_search(path) is None and presets.load_search(lm, sae, [tmp_path]) is None
    path.write_text(json.dumps({**res.to_json(), "format": 99}))
    assert presets.read_search(path) is None


def test_a_search_that_found_nothing_says_so_instead_of_offering_presets(word_bank, monkeypatch, tmp_path):
    lm, sae, bank = word_bank
    fake_calibrations(monkeypatch, {})
    presets.write_search(presets.search(lm, sae, bank, concepts=fixture_concepts(), tries=3), tmp_path)
    d = presets.defaults(lm, sae, bank, roots=[tmp_path / "no-eval"], preset_roots=[tmp_path])
    assert d.source == "search" and d.presets == () and f"no preset at layer {sae.layer}" in d.reason and "0 of the " in d.reason


def test_a_feature_the_search_measured_keeps_its_own_result_over_the_layer_amp(word_bank, monkeypatch, tmp_path):
    lm, sae, bank = word_bank
    cands = presets.search_candidates(bank, lm.tokenizer, fixture_concepts())
    good, bad = cands[0][1], cands[1][1]
    fake_calibrations(monkeypatch, {good: 1.5})
    res = presets.search(lm, sae, bank, concepts=fixture_concepts(), tries=2, n=2)
    assert [t.feature for t in res.tried] == [good, bad]
    presets.write_search(res, tmp_path / "p")
    train = [{"concept": "alpha", "method": "sae_output", "strength": a, "split": "train", "combined": v} for a, v in ((2.0, 0.2), (4.0, 0.6))]
    write_run(tmp_path / "eval", lm, sae, [summary_row("alpha", "sae_output", good, 4.0, 0.6), summary_row("alpha", "unsteered", -1, 0.0, 0.0)], train)
    layer = presets.defaults(lm, sae, bank, roots=[tmp_path / "eval"], preset_roots=[tmp_path / "p"])
    assert layer.source == "search" and layer.strength == 4.0 and layer.presets == res.presets  # the search's presets, the evaluation's amp
    amp, why = presets.feature_strength(lm, sae, layer, good, bank)
    assert amp == 1.5 and "in 3 of 3 samples of the lab" in why
    amp, why = presets.feature_strength(lm, sae, layer, bad, bank)  # measured and failed: not the layer's amp
    assert amp == presets.FALLBACK_STRENGTH and "no amp of 1" in why and f"tried feature {bad}" in why
    other = next(f for f in map(int, bank.features) if f not in (good, bad))
    amp, why = presets.feature_strength(lm, sae, layer, other, bank)  # not measured: the layer's amp, saying where it comes from
    assert amp == 4.0 and why == layer.strength_reason and why.startswith("from ") and "best amp at layer 1 is 4" in why


def test_a_wider_pool_adds_candidates_after_the_list_and_a_finished_search_goes_on_with_it(word_bank, monkeypatch):
    lm, sae, bank = word_bank

    class Marked:  # the fixture's word-level vocabulary, its tokens marked word-initial as SentencePiece marks them
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __call__(self, *a, **kw):
            return self.tok(*a, **kw)

        def convert_ids_to_tokens(self, ids):
            got = self.tok.convert_ids_to_tokens(ids)
            return ["▁" + t for t in got] if isinstance(got, list) else "▁" + got

    lm = dataclasses.replace(lm, tokenizer=Marked(lm.tokenizer))
    concepts = [presets.search_candidates(bank, lm.tokenizer, fixture_concepts(), pool=0)[0][0]]  # a list of one concept
    listed = presets.search_candidates(bank, lm.tokenizer, concepts, pool=0)
    wide = presets.search_candidates(bank, lm.tokenizer, concepts, pool=len(bank.features))
    assert wide[:len(listed)] == listed and len(wide) > len(listed)
    asked = fake_calibrations(monkeypatch, {})
    first = presets.search(lm, sae, bank, concepts=concepts, pool=0, tries=len(wide))
    assert asked == [c[1] for c in listed] and first.pool == 0 and f"(of {len(listed)}: concepts from the concept list whose" in first.summary()
    assert not first.goes_on(len(wide)) and first.goes_on(len(wide), pool=5) and not first.goes_on(len(listed), pool=5)
    asked.clear()
    more = presets.search(lm, sae, bank, concepts=concepts, pool=len(bank.features), tries=len(wide), resume=first)
    assert asked == [c[1] for c in wide[len(listed):]] and more.tried[:len(listed)] == first.tried  # only the new ones
    assert presets.Search.from_json(json.loads(json.dumps(more.to_json()))) == more
    with pytest.raises(presets.ConfigError, match="pool must be 0"):
        presets.search(lm, sae, bank, concepts=concepts, pool=-1)


def test_the_app_opens_on_the_sae_whose_search_found_most_presets(word_bank, monkeypatch, tmp_path):
    lm, sae, bank = word_bank
    from saesteer import paths

    monkeypatch.setattr(paths, "BUNDLED_PRESETS", tmp_path)
    cands = presets.search_candidates(bank, lm.tokenizer, fixture_concepts())
    fake_calibrations(monkeypatch, {cands[0][1]: 1.0, cands[1][1]: 2.0})
    res = presets.search(lm, sae, bank, concepts=fixture_concepts(), tries=2)
    for sid, tried in (("A", res.tried[:1]), ("B", res.tried), ("C", res.tried)):
        presets.write_search(presets.Search(**{**vars(res), "sae_id": sid, "tried": tried}), tmp_path)
    assert presets.opening_sae(lm.name, ["A", "B", "C", "D"]) == "B"  # most presets; the first on a tie
    assert presets.opening_sae(lm.name, ["D"]) is None


def test_presets_cli_refuses_bad_input_in_one_line(capsys):
    from saesteer.__main__ import main

    for argv, message in ((["--layers", "2,x"], "comma-separated integers"), (["--layers", "2", "--tries", "0"], "at least 1"),
                          (["--layers", "2", "--layer", "2"], "not both"), (["--layers", ","], "names no layer"),
                          (["--layers", "2", "--pool", "-1"], "--pool must be 0")):
        assert main(["presets", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_the_bundled_picker_opens_on_the_layer_whose_shipped_search_found_most_presets():
    from saesteer.config import EMBEDDED_MODEL
    from saesteer.saes import list_bundled
    from saesteer.ui import loaders

    if not list_bundled():
        pytest.skip("no bundled SAEs installed under assets/saes/")
    choices = loaders.sae_choices(EMBEDDED_MODEL, "bundled")
    opens = [c.ref for c in choices if c.opens]
    assert opens == [presets.opening_sae(EMBEDDED_MODEL, [c.ref for c in choices])] and opens[0] is not None
