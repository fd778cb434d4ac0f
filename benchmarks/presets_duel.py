"""Do the shipped demo presets also say their word in the duel? The preset search checks each preset as the
lab decodes it (baseline + steered, one 2-row batch); the concept duel decodes baseline | activation pick |
output pick as one 3-row batch, where the bf16 copy can sample another continuation. For every preset of every
bundled layer, this decodes the duel at the preset's amp for seeds 0-2 exactly as the page does
(``duel.stream_duel`` on the pages' decode path) and scores the output-pick column with the preset target
(``presets.said_by_steering``: says the word where the baseline column does not, repetition <= 0.5, the
duel's fluency >= 0.5). Prints one row per preset and the share that passes at seed 0 and in 2 of 3 seeds.

    nice -n 5 python benchmarks/presets_duel.py [--layers 2,5,8,11,14,17] [--out benchmarks/results/presets_duel.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saesteer import duel, presets
from saesteer.config import NEUTRAL_PROMPT, SaeSpec
from saesteer.evaluation import repetition
from saesteer.evaluation.candidates import FeatureBank
from saesteer.features import FeatureData
from saesteer.models import load_model
from saesteer.paths import bundled_feature_dir
from saesteer.saes import list_bundled, load_sae
from saesteer.steering import default_fast


def duel_texts(lm, sae, plan: duel.DuelPlan, concept: str, amp: float, seed: int, fast: bool) -> dict[str, str]:
    params = duel.DuelParams(concept=concept, strength=amp, seed=seed, max_new_tokens=presets.CALIBRATION_TOKENS)
    out = {c: "" for c in plan.columns}
    for step in duel.stream_duel(lm, sae, params, plan, fast=fast):
        for c, piece in step.items():
            out[c] += piece
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=None, help="comma-separated bundled layers (default: all)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    lm = load_model()
    fast = default_fast(lm)
    want = None if args.layers is None else {int(x) for x in args.layers.split(",")}
    lines = ["| layer | preset | feature | amp | output-pick column: seeds of 0–2 that say it | seed 0 |", "|---|---|---|---|---|---|"]
    n = n_seed0 = n_most = 0
    for e in list_bundled():
        if want is not None and e["layer"] not in want:
            continue
        sae = load_sae(SaeSpec(source="bundled", layer=e["layer"]), lm)
        bank = FeatureBank.from_feature_data(FeatureData.load(bundled_feature_dir(lm.name, sae.id)))
        d = presets.defaults(lm, sae, bank)
        for p in d.presets:
            plan = duel.plan(duel.candidates(lm, bank, p.concept))
            if plan.features.get("output") != p.feature:
                lines.append(f"| L{sae.layer} | {p.concept} | f{p.feature} | {p.strength:g} | the duel's output pick is f{plan.features.get('output')} | – |")
                continue
            oks = []
            for seed in presets.CALIBRATION_SEEDS:
                t = duel_texts(lm, sae, plan, p.concept, p.strength, seed, fast)
                said, base = presets.mentions_word(t["output"], p.word), presets.mentions_word(t["baseline"], p.word)
                flu = duel.score(lm, NEUTRAL_PROMPT, p.word, {"baseline": t["baseline"], "steered": t["output"]})["steered"].fluency
                oks.append(presets.said_by_steering(said, base, repetition(t["output"]), flu))
            n += 1
            n_seed0 += oks[0]
            n_most += oks[0] and sum(oks) >= presets.MIN_SEEDS_OK
            lines.append(f"| L{sae.layer} | {p.concept} | f{p.feature} | {p.strength:g} | {sum(oks)}/{len(oks)} | {'yes' if oks[0] else 'no'} |")
            print(lines[-1], flush=True)
    summary = (f"\n{n_seed0} of {n} presets say their word in the duel's output-pick column at seed 0; {n_most} of {n} at seed 0 "
               f"and in at least {presets.MIN_SEEDS_OK} of {len(presets.CALIBRATION_SEEDS)} seeds (decode path: "
               f"{'bf16 copy' if fast else 'exact model'}).")
    print(summary)
    if args.out:
        Path(args.out).write_text("# Presets in the duel's 3-row batch\n\n`python benchmarks/presets_duel.py`\n\n" + "\n".join(lines) + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
