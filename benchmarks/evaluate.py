"""Cost of the steering evaluation on the embedded model, measured in one run.

1. The exact greedy head in vocabulary blocks (``fasthead.exact_argmax``, what every float32 greedy decode step
   uses) against the argmax of the full logits at the evaluation's batch sizes: time and agreement.
2. Batched steered decoding (what the evaluation does: one ``generate`` call over prefixes × strengths,
   per-row strengths, paper mode) against single-stream decoding of the same rows: decoded tokens/s.
3. The continuation perplexity fast path (unembedding only at continuation positions, running log-sum-exp
   over vocabulary blocks) against the obvious full-logits forward per row: time ratio and largest NLL
   difference.
4. LoRA training time per step.
5. ``--run N``: the real evaluation (``run_evaluation``, the CLI's defaults: the paper's 12-point grid, 20
   prefixes, 24 tokens, concepts batched three at a time) of the first N concepts with candidates, timed,
   with the minutes that 30 such concepts take at that rate. ``python -m saesteer eval --layer L`` itself
   logs each batch's seconds and tokens/s, and writes them to ``timings.jsonl``.
6. ``--smoke``: a small real run of the protocol (1 concept, 2 strengths, 4 prefixes, every method).

The SAE is the bundled one of ``--layer`` when it exists. Without bundled feature data, selection needs
scores: the smoke run then computes the logit lens of every feature, output scores of the concept's
candidates and input scores from a short activation pass (``--input-tokens``), and says so. Without a
bundled SAE it uses a random sae-lens TopK SAE, named as such; its numbers price the code path only.
Rates are wall-clock rates at the current load (printed): run it on an idle machine.

    python benchmarks/evaluate.py [--layer 8] [--tokens 8]
    python benchmarks/evaluate.py --run 6          # six concepts for real (≈ 10 min on the 2-core VM)
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
import torch


def load(layer: int):
    from saesteer.config import SaeSpec
    from saesteer.models import load_model
    from saesteer.saes import SaeLoadError, load_sae

    lm = load_model()
    try:
        return lm, load_sae(SaeSpec(layer=layer), lm), "bundled"
    except SaeLoadError:
        from saesteer.testing import make_tiny_sae

        return lm, make_tiny_sae(d_in=lm.d_model, d_sae=4096, layer=layer, k=64), "RANDOM (untrained, prices the code path only)"


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def bench_generate(lm, sae, prefixes, rows: int, tokens: int, single: int) -> dict:
    from saesteer.evaluation import PAPER_STRENGTHS
    from saesteer.steering import generate

    prompts = [prefixes[i % len(prefixes)] for i in range(rows)]
    strengths = torch.tensor([[PAPER_STRENGTHS[i % len(PAPER_STRENGTHS)]] for i in range(rows)])
    batched, wall, cpu = _timed(lambda: generate(lm, prompts, sae=sae, features=[3], strengths=strengths, max_new_tokens=tokens))
    out = {"tok_s": rows * tokens / wall, "tok_cpu_s": rows * tokens / cpu}
    if single:
        alone, w1, _ = _timed(lambda: [generate(lm, [prompts[i]], sae=sae, features=[3], strengths=strengths[i : i + 1], max_new_tokens=tokens)[0] for i in range(single)])
        out.update(single_tok_s=single * tokens / w1, same=f"{sum(a == b for a, b in zip(alone, batched))}/{single}")
    return out


def bench_nll(lm, prefixes, rows: int, tokens: int, ref_rows: int = 16) -> dict:
    from saesteer.evaluation import continuation_nll
    from saesteer.steering import generate

    pre = [prefixes[i % len(prefixes)] for i in range(rows)]
    conts = generate(lm, pre, max_new_tokens=tokens)
    t0 = time.perf_counter()
    fast, count = continuation_nll(lm, pre, conts)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = []
    with torch.no_grad():
        for p, c in zip(pre[:ref_rows], conts[:ref_rows]):
            pi = lm.tokenizer(p).input_ids
            ci = lm.tokenizer(c, add_special_tokens=False).input_ids
            logits = lm.model(input_ids=torch.tensor([pi + ci])).logits[0].float()
            lp = logits.log_softmax(-1)[len(pi) - 1 : -1].gather(1, torch.tensor(ci)[:, None])[:, 0]
            slow.append(-float(lp.mean()))
    t_slow = time.perf_counter() - t0
    per_row_fast, per_row_slow = t_fast / rows, t_slow / ref_rows
    return {"positions_s": int(count.sum()) / t_fast, "ratio": per_row_slow / per_row_fast,
            "max_diff": float(np.nanmax(np.abs(fast[:ref_rows] - np.array(slow))))}


def bench_lora(lm, layer: int, params) -> float:
    """Seconds per LoRA training step (adapter setup and unload amortised over the default steps)."""
    from saesteer.baselines import lora_adapter

    texts = ["The apple tree in the garden gave red apples every autumn, and the children ate them all."] * params.batch_size
    t0 = time.perf_counter()
    with lora_adapter(lm, layer, texts, params):
        pass
    return (time.perf_counter() - t0) / params.steps


def bench_head(lm, rows: int, reps: int = 3) -> dict:
    """Blocked exact argmax vs the argmax of the full (rows, vocab) logits, on final-normed hidden states of
    real prefixes (best of ``reps`` for each)."""
    from saesteer.evaluation import default_prefixes
    from saesteer.fasthead import exact_argmax

    prompts = [default_prefixes()[i % 20] for i in range(rows)]
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        h = lm.model.get_decoder()(**enc).last_hidden_state[:, -1].contiguous()
        h = h + 0.3 * torch.randn_like(h) * h.std()  # spread the rows: not 20 distinct states repeated
    w = lm.lm_head.weight
    full = lambda: (h @ w.T).argmax(-1)
    blocked = lambda: exact_argmax(h, w, None, lm.softcap)
    times = {}
    for name, fn in (("full", full), ("blocked", blocked)):
        fn()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    return {"full_ms": times["full"] * 1e3, "blocked_ms": times["blocked"] * 1e3, "same": f"{int((full() == blocked()).sum())}/{rows}"}


def real_run(lm, sae, kind: str, n: int) -> None:
    """The evaluation as the CLI runs it, on the first ``n`` concepts with candidates, timed."""
    from saesteer import features as F
    from saesteer.evaluation import (
        EvalParams,
        FeatureBank,
        default_concepts,
        default_prefixes,
        run_evaluation,
    )

    data = F.load_bundled(sae.id, lm.name) if kind == "bundled" else None
    if data is None:
        print("--run needs the bundled feature data of the layer (scores for the selection)")
        return
    bank = FeatureBank.from_feature_data(data, "bundled")
    params = EvalParams()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = run_evaluation(lm, sae, bank, default_concepts(), out, params, prefixes=default_prefixes(), n_concepts=n, log=print)
        secs = time.perf_counter() - t0
    t = res.timings
    batches = float(t["seconds"].sum())
    done = sum(len(c) for c in t["concepts"])
    print(f"real run: {done} concepts in {secs:.0f}s ({batches:.0f}s in concept batches, {secs - batches:.0f}s setup: unsteered rows, "
          f"concept-sentence mining); {t['row_steps'].sum() / t['gen_seconds'].sum():.0f} decoded tokens/s; LoRA training "
          f"{t['lora_seconds'].sum() / done:.1f}s per concept; => 30 concepts like these ≈ {(secs - batches + batches / done * 30) / 60:.0f} min (concepts with more distinct picks cost more)")


def smoke(lm, sae, kind: str, input_tokens: int) -> None:
    from saesteer import features as F
    from saesteer.baselines import LoraParams
    from saesteer.corpus import pack_sequences
    from saesteer.corpus import iter_bundled
    from saesteer.evaluation import (
        EvalParams,
        FeatureBank,
        concept_token_ids,
        default_prefixes,
        run_evaluation,
    )

    data = F.load_bundled(sae.id, lm.name) if kind == "bundled" else None
    concept = "water"
    if data is not None:
        bank, how = FeatureBank.from_feature_data(data, "bundled"), "bundled feature data"
    else:
        from saesteer.scores import logit_lens

        lens = logit_lens(lm, sae, k=20)
        ids = concept_token_ids(lm.tokenizer, concept)
        cands = lens.features[np.isin(lens.top_ids, ids).any(1)]
        if len(cands) == 0:
            print(f"smoke: no feature has {concept!r} in its logit-lens top-20; nothing to run")
            return
        seqs = pack_sequences(lm.tokenizer, iter_bundled("train"), 128)
        d = F.compute_many(lm, [sae], corpus_sequences=seqs, n_tokens=input_tokens, cache=False, use_bundled=False, features=cands)[0]
        bank = FeatureBank.from_feature_data(d, f"smoke: {input_tokens} corpus tokens")
        how = f"{len(cands)} candidates scored here; input scores from only {input_tokens} corpus tokens"
    params = EvalParams(strengths=(2.0, 8.0), diffmean_coeffs=(0.3, 1.0), n_prefixes=4, lora=LoraParams(steps=4))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = run_evaluation(lm, sae, bank, [concept], out, params, prefixes=default_prefixes(), n_concepts=1, log=print)
        secs = time.perf_counter() - t0
    t = res.timings.iloc[0]
    print(f"smoke ({kind} SAE {sae.id}; {how}): {secs:.0f}s in all, {t['gen_seconds']:.0f}s decoding "
          f"{t['row_steps']} row-steps = {t['row_steps'] / t['gen_seconds']:.1f} tokens/s, LoRA {t['lora_seconds']:.0f}s")
    cols = ["method", "feature", "strength", "concept_score", "fluency", "combined"]
    print(res.summary()[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for _, r in res.generations.query("split == 'test'").groupby("method").head(1).iterrows():
        print(f"  {r['method']:>10} | {r['prefix']}{r['text']!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--rows", type=int, default=440, help="rows of the large decode call (440: three distinct features × 12 strengths + 8 DiffMean coefficients, × 10 prefixes)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens decoded per row in the measurements")
    ap.add_argument("--single", type=int, default=4, help="rows decoded one by one for the single-stream rate")
    ap.add_argument("--run", type=int, default=0, metavar="N", help="also time the real evaluation of N concepts (default settings)")
    ap.add_argument("--smoke", action="store_true", help="also run the protocol end to end on one concept")
    ap.add_argument("--smoke-only", action="store_true", help="only the end-to-end run")
    ap.add_argument("--run-only", action="store_true", help="only the --run measurement")
    ap.add_argument("--input-tokens", type=int, default=20_000)
    args = ap.parse_args()

    from saesteer.evaluation import EvalParams, default_prefixes

    lm, sae, kind = load(args.layer)
    prefixes = default_prefixes()
    print(f"model {lm.name}, SAE {sae.id} ({kind}), torch threads {torch.get_num_threads()}")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.smoke_only:
        smoke(lm, sae, kind, args.input_tokens)
        return
    if not args.run_only:
        params = EvalParams()
        for rows in (args.rows, 90, 10):
            h = bench_head(lm, rows)
            print(f"greedy head, {rows} rows: full logits {h['full_ms']:.0f} ms, vocabulary blocks {h['blocked_ms']:.0f} ms "
                  f"(x{h['full_ms'] / h['blocked_ms']:.2f}); same token {h['same']}")
        g = bench_generate(lm, sae, prefixes, args.rows, args.tokens, args.single)
        print(f"steered decode, {args.rows} rows: {g['tok_s']:.1f} tok/s ({g['tok_cpu_s']:.1f} per CPU-second); single-stream "
              f"{g['single_tok_s']:.1f} tok/s (batched x{g['tok_s'] / g['single_tok_s']:.1f}); batched == single for {g['same']} rows")
        for rows in (90, 30):
            print(f"steered decode, {rows} rows: {bench_generate(lm, sae, prefixes, rows, args.tokens, 0)['tok_s']:.1f} tok/s")
        n = bench_nll(lm, prefixes, 64, params.max_new_tokens)
        print(f"continuation NLL: {n['positions_s']:.0f} positions/s, x{n['ratio']:.1f} faster per row than one full forward per row, "
              f"max |diff| {n['max_diff']:.2e} nats")
        lora = bench_lora(lm, sae.layer, params.lora)
        print(f"LoRA: {lora:.1f}s per training step ({params.lora.batch_size} sentences of <= {params.lora.max_tokens} tokens)")
    if args.run or args.run_only:
        real_run(lm, sae, kind, args.run or 6)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.smoke:
        smoke(lm, sae, kind, args.input_tokens)


if __name__ == "__main__":
    main()
