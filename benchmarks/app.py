"""Latency of the dashboard on the embedded Gemma 3 270M, measured in one run:

- warm page switch: the server-side script run of each page (sidebar + page) once models and scores are
  cached, through Streamlit's AppTest (browser rendering not included);
- time to the first steered token after the Generate click (in-app, from the click's script run);
- load time of one bundled layer's feature scores (cold, from disk) and of every layer's score table;
- live decode tokens/s, detokenization included: single stream (``steering.stream``, steered and
  unsteered, float32 vs fast = the bf16 copy of the whole model) and the side-by-side pair the lab shows
  (``steering.stream_pair``: baseline + steered as one 2-row batch, tokens/s per column);
- the concept duel's three columns (baseline | activation pick | output pick as ONE 3-row batch, sampled at
  0.7 as the page does): time from the call to the first token, tokens/s per stream and in total, on the
  exact model and on the bf16 copy (``--duel-only`` runs just this part; on CUDA the exact model is the path).

If no precomputed feature data is bundled yet, it is computed once for the chosen layer over a small
slice of the bundled corpus into the app's on-disk cache (where the app would put it; bundled data takes
precedence once it exists), and the output says so.

    nice -n 15 python benchmarks/app.py [--layer 5] [--tokens 48] [--repeats 3] [--duel-only] [--concept water]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def stream_rate(lm, sae, prompt: str, tokens: int, features: tuple[int, ...], fast: bool) -> tuple[float, float]:
    """(seconds to the first piece, tokens per second after it) of one streamed continuation."""
    from saesteer.config import SteerParams
    from saesteer.steering import stream

    params = SteerParams(features=features, strengths=(4.0,) * len(features), max_new_tokens=tokens)
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in stream(lm, prompt, sae=sae if features else None, params=params, fast=fast):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first) if n > 1 else float("nan")


def pair_rate(lm, sae, prompt: str, tokens: int, feature: int, fast: bool) -> tuple[float, float]:
    """(seconds to the first steered piece, steps per second after it = tokens/s per column) of one paired stream."""
    from saesteer.config import SteerParams
    from saesteer.steering import stream_pair

    params = SteerParams(features=(feature,), strengths=(4.0,), max_new_tokens=tokens)
    t0 = time.perf_counter()
    first = None
    n = 0
    for _, steered in stream_pair(lm, prompt, sae=sae, params=params, fast=fast):
        if first is None and steered:
            first = time.perf_counter()
        if first is not None:
            n += 1
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first) if n > 1 else float("nan")


def duel_rate(lm, sae, bank, concept: str, tokens: int, fast: bool) -> tuple[float, float, int]:
    """(seconds to the first token, decode steps per second after it = tokens/s per stream, streams) of one duel."""
    from saesteer import duel

    plan = duel.plan(duel.candidates(lm, bank, concept))
    params = duel.DuelParams(concept=concept, strength=2.0, max_new_tokens=tokens)
    t0 = time.perf_counter()
    first = None
    n = 0
    for step in duel.stream_duel(lm, sae, params, plan, fast=fast):
        if first is None and any(step.values()):
            first = time.perf_counter()
        if first is not None:
            n += 1
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first) if n > 1 else float("nan"), len(plan.columns)


def duel_part(lm, sae, data, concept: str, tokens: int, repeats: int) -> None:
    from saesteer import steering
    from saesteer.evaluation import FeatureBank

    bank = FeatureBank.from_feature_data(data)
    duel_rate(lm, sae, bank, concept, 4, fast=False)  # warm-up
    print(f"concept duel “{concept}”, {tokens} new tokens per column, sampled at 0.7 (median of {repeats}):")
    results = {}
    assert steering.FAST_MAX_BATCH >= 3, "the duel's three rows decode on the bf16 copy only up to FAST_MAX_BATCH"
    for label, fast in (("exact float32", False), ("bf16 copy", True)):
        if fast:
            duel_rate(lm, sae, bank, concept, 4, fast=True)  # warm-up (builds the copy once)
        runs = [duel_rate(lm, sae, bank, concept, tokens, fast) for _ in range(repeats)]
        per, cols = median([r[1] for r in runs]), runs[0][2]
        results[label] = per
        print(f"  {label:<30} {cols} streams · {per:5.1f} tokens/s per stream · {per * cols:5.1f} tokens/s in total · "
              f"first token {median([r[0] for r in runs]) * 1e3:.0f} ms")
    a, b = results.values()
    print(f"  bf16 copy / exact float32, tokens/s: {b / a:.2f}x (measured in this run on {lm.device})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per decode measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus-tokens", type=int, default=20_000, help="corpus tokens if feature data must be computed")
    parser.add_argument("--duel-only", action="store_true", help="measure only the concept duel's three columns")
    parser.add_argument("--concept", default="water", help="the duel's concept")
    args = parser.parse_args()

    from saesteer.config import SaeSpec
    from saesteer.features import FeatureData, compute_many
    from saesteer.models import load_model
    from saesteer.paths import bundled_feature_dir
    from saesteer.saes import list_bundled, load_sae

    t0 = time.perf_counter()
    lm = load_model()
    print(f"model: {lm.name} loaded in {time.perf_counter() - t0:.1f} s ({lm.n_params() / 1e6:.0f} M parameters, {lm.device}, {lm.dtype})")
    bundled = list_bundled()
    if not bundled:
        print("no bundled SAEs are installed: this benchmark needs them (assets/saes/gemma-3-270m)")
        return 1
    sae = load_sae(SaeSpec(source="bundled", layer=args.layer), lm)
    print(f"SAE: {sae.id} (bundled, trained), width {sae.width}")

    # --- feature scores load time --------------------------------------------------------------------
    from saesteer.ui.loaders import cache_feature_dir

    data_dir = bundled_feature_dir(lm.name, sae.id)
    if not (data_dir / "meta.json").exists():
        data_dir = cache_feature_dir(lm.name, sae)
        if (data_dir / "meta.json").exists():
            print(f"no bundled feature data for {sae.id}: using the app's cached data in {data_dir}")
        else:
            from saesteer.corpus import pack_sequences
            from saesteer.corpus import iter_bundled

            print(f"no bundled feature data for {sae.id}: computing it over {args.corpus_tokens:,} corpus tokens into {data_dir} (not timed)…")
            t0 = time.perf_counter()
            data = compute_many(lm, [sae], pack_sequences(lm.tokenizer, iter_bundled("train"), 128), n_tokens=args.corpus_tokens)[0]
            data.save(data_dir)
            print(f"  computed in {time.perf_counter() - t0:.0f} s")
    if args.duel_only:
        duel_part(lm, sae, FeatureData.load(data_dir), args.concept, args.tokens, args.repeats)
        return 0
    size = sum(p.stat().st_size for p in data_dir.iterdir()) / 1e6
    loads = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        data = FeatureData.load(data_dir)
        loads.append(time.perf_counter() - t0)
    print(f"scores load, one layer ({size:.1f} MB on disk, cold FeatureData.load): median {median(loads) * 1e3:.0f} ms over {args.repeats}")

    # --- the app through AppTest ---------------------------------------------------------------------
    from streamlit.testing.v1 import AppTest

    from saesteer.ui.nav import PAGES as NAV

    pages = [info.path for info in NAV.values()]
    at = AppTest.from_file(str(ROOT / NAV["home"].path), default_timeout=600)
    at.query_params.update({"layer": str(args.layer), "prompt": "From my experience,"})
    t0 = time.perf_counter()
    at.run()
    print(f"first app run (model + SAE + scores into the caches): {time.perf_counter() - t0:.1f} s")
    if at.exception:
        print("app raised:", [e.value for e in at.exception])
        return 1
    for page in pages:  # warm every page once (plots, lens tokens, per-page caches)
        at.switch_page(page).run()
    switches: dict[str, list[float]] = {p: [] for p in pages}
    for _ in range(args.repeats):
        for page in pages:
            t0 = time.perf_counter()
            at.switch_page(page).run()
            switches[page].append(time.perf_counter() - t0)
    print("warm page switch (server-side script run, median):")
    for page, times in switches.items():
        print(f"  {page:<24} {median(times) * 1e3:7.0f} ms")
    print(f"  all pages                {median([t for ts in switches.values() for t in ts]) * 1e3:7.0f} ms")

    at.switch_page(NAV["lab"].path).run()
    at.slider(key="lab_max_new").set_value(8).run()
    firsts = []
    for i in range(args.repeats):
        at.text_area(key="lab_prompt").input(f"From my experience, {i}").run()
        at.button(key="lab_go").click().run()
        firsts.append(at.session_state["lab_last"]["first_token_s"])
    print(f"first steered token after the Generate click (in-app, both columns as one pair, fast decode {at.checkbox(key='lab_fast').value}): median {median(firsts) * 1e3:.0f} ms over {args.repeats}")

    # --- live decode ---------------------------------------------------------------------------------
    feature = int(data.table.sort_values("output_score", ascending=False)["feature"].iloc[0])
    print(f"live decode, {args.tokens} new tokens, steering feature {feature} (median of {args.repeats}):")
    singles = (("single, steered, fast (bf16 whole model)", (feature,), True), ("single, steered, float32", (feature,), False),
               ("single, unsteered, fast", (), True), ("single, unsteered, float32", (), False))
    for label, features, fast in singles:
        runs = [stream_rate(lm, sae, "From my experience,", args.tokens, features, fast) for _ in range(args.repeats)]
        print(f"  {label:<42} {median([r[1] for r in runs]):5.1f} tokens/s · first token {median([r[0] for r in runs]) * 1e3:.0f} ms")
    for label, fast in (("pair (baseline + steered), fast", True), ("pair (baseline + steered), float32", False)):
        runs = [pair_rate(lm, sae, "From my experience,", args.tokens, feature, fast) for _ in range(args.repeats)]
        print(f"  {label:<42} {median([r[1] for r in runs]):5.1f} tokens/s per column · first steered token {median([r[0] for r in runs]) * 1e3:.0f} ms")
    duel_part(lm, sae, data, args.concept, args.tokens, args.repeats)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
