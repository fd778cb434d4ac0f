"""Fluent defaults: presets and default strengths picked by code from evaluation results (fresh vs stale runs),
the calibration fallback, and, on the real embedded model, that the presets say their word without looping."""

from __future__ import annotations

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


def test_calibration_takes_the_smallest_amp_that_most_seeds_say_fluently():
    texts = {1.0: "the sea is calm", 2.0: "an ocean storm ocean", 3.0: "the ocean is deep and wide", 6.0: "ocean ocean"}
    fluency = {1.0: 0.9, 2.0: 0.3, 3.0: 0.7, 6.0: 0.0}
    n_ok = {1.0: 0, 2.0: 1, 3.0: 2, 6.0: 3}  # 2.0 said it fluently for one seed only: luck, not a default
    c = presets._choose(5, "ocean", texts, fluency, n_ok, 3)
    assert c.ok and c.strength == 3.0 and "amp 3" in c.describe() and "2 of 3 samples" in c.describe()
    c = presets._choose(5, "ocean", {1.0: "the sea", 4.0: "ocean ocean"}, {1.0: 0.9, 4.0: 0.1}, {1.0: 0, 4.0: 1}, 3)
    assert not c.ok and c.strength == presets.FALLBACK_STRENGTH and "no amp" in c.describe()


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
    n = 2 * len(presets.CALIBRATION_SEEDS)
    assert calls == [rows] * n and rows <= steering.FAST_MAX_BATCH  # small enough for the copy, as the pages run
    assert set(first[0].texts) == set(presets.CALIBRATION_GRID) and first[0].n_seeds == len(presets.CALIBRATION_SEEDS)
    again = presets.calibrate(lm, sae, [f2], [w2])
    assert calls == [rows] * n and again[0] == first[1]
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
    k = len(presets.CALIBRATION_SEEDS)
    assert seen == [{"max_new_tokens": LIVE_NEW_TOKENS, "temperature": PAPER_TEMPERATURE, "fast": default_fast(lm)}] * k
    assert default_fast(lm) is True  # the tiny model is on the CPU: the copy is what the pages start with
    presets.calibrate(lm, sae, [f], [w], fast=False)
    assert seen[-1]["fast"] is False and len(seen) == 2 * k


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
    """Issue 12's last target, measured honestly: the lab's default feature and every demo preset, at their
    default strength (as the lab and the duel start: neutral prompt, temperature 0.7, 32 new tokens, the bf16 copy
    on a CPU), mention the feature's top word with word-bigram repetition <= 0.5 and the duel's fluency >= 0.5,
    in most of the calibration seeds, in the lab's own batch shape. Where the calibration found no such amp, the
    default must be the fallback and say so (the README reports which presets: on the shipped L2, "river" f2386
    does not say "river" fluently in 2 of 3 samples at any grid amp). Checked at the layer the app opens on."""
    from saesteer.config import SaeSpec
    from saesteer.features import FeatureData
    from saesteer.paths import bundled_feature_dir
    from saesteer.models import load_model
    from saesteer.saes import list_bundled, load_sae
    from saesteer.steering import generate

    lm = load_model()
    layer = list_bundled()[0]["layer"]  # the sidebar opens on the first bundled layer
    sae = load_sae(SaeSpec(source="bundled", layer=layer), lm)
    bank = FeatureBank.from_feature_data(FeatureData.load(bundled_feature_dir(lm.name, sae.id)))
    d = presets.defaults(lm, sae, bank)
    assert d.presets, f"no preset at layer {layer}: {d.reason}"
    amps = [presets.preset_strength(lm, sae, p)[0] for p in d.presets]  # presets[0] is also the lab's default feature
    from saesteer import duel

    # As the lab shows it (baseline + steered, one 2-row batch; another batch shape than the calibration's),
    # for each calibration seed: most samples must say the word without looping and stay fluent.
    for p, a in zip(d.presets, amps):
        cal = presets.calibrate(lm, sae, [p.feature], [p.word])[0]
        if p.strength is None and not cal.ok:  # calibrated, and no amp worked: the page must say so, not pretend
            why = presets.preset_strength(lm, sae, p)[1]
            assert a == presets.FALLBACK_STRENGTH and "no amp" in why and "fluently" in why, why
            continue
        seen = []
        for sd in presets.CALIBRATION_SEEDS:
            base, t = generate(lm, [presets.NEUTRAL_PROMPT] * 2, sae=sae, features=[p.feature], strengths=torch.tensor([[0.0], [a]]),
                               max_new_tokens=LIVE_NEW_TOKENS, temperature=PAPER_TEMPERATURE, seed=[sd, sd], fast=default_fast(lm))
            n, rep = presets.mentions_word(t, p.word), repetition(t)
            flu = duel.score(lm, presets.NEUTRAL_PROMPT, p.word, {"baseline": base, "steered": t})["steered"].fluency
            seen.append((n >= 1 and rep <= presets.MAX_REPETITION and flu >= duel.FLUENT, f"seed {sd}: {n}× {p.word!r}, repetition {rep:.2f}, fluency {flu:.2f}: {t!r}"))
        ok = sum(good for good, _ in seen)
        assert ok >= presets.MIN_SEEDS_OK, f"L{layer} preset {p.concept!r} (f{p.feature}, amp {a:g}): " + " | ".join(w for _, w in seen)
