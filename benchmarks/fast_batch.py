"""Where the bf16 copy stops paying: streamed decode tokens/s in total, float32 vs the bf16 copy
(``steering.fast_model``), at 3 to 12 rows of one batch (what ``steering.FAST_MAX_BATCH`` bounds), on the
embedded model with a bundled SAE, sampled at 0.7 as the duel does. Prints the ratio per batch, measured in
one run (best of ``--repeats`` per configuration; other jobs on the machine shift the times, less the ratio).

    nice -n 5 python benchmarks/fast_batch.py [--layer 2] [--feature 998] [--tokens 32] [--repeats 2] [--rows 3,4,6,8,12]
"""

from __future__ import annotations

import argparse
import time

import torch

from saesteer import steering
from saesteer.config import SaeSpec, SteerParams
from saesteer.models import load_model
from saesteer.saes import load_sae


def total_rate(lm, sae, feature: int, rows: int, params: SteerParams, fast: bool) -> float:
    """Tokens per second summed over ``rows`` streamed rows (row 0 the baseline, the others steered at amp 2):
    decode steps after the first piece × rows, over their time (a row that ends early still costs its step)."""
    strengths = torch.zeros(rows, 1)
    strengths[1:, 0] = 2.0
    first, n = None, 0
    for _ in steering.stream_rows(lm, "From my experience,", sae=sae, features=(feature,), strengths=strengths, params=params, fast=fast):
        if first is None:
            first = time.perf_counter()
        n += 1
    return (n - 1) / (time.perf_counter() - first) * rows if n > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--feature", type=int, default=998)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", default="3,4,6,8,12")
    args = ap.parse_args()
    lm = load_model()
    sae = load_sae(SaeSpec(layer=args.layer), lm)
    params = SteerParams(max_new_tokens=args.tokens, temperature=0.7, seed=0)
    old = steering.FAST_MAX_BATCH
    steering.FAST_MAX_BATCH = 10**6  # measure the copy at every size asked for
    try:
        total_rate(lm, sae, args.feature, 2, params, True)  # warm-up: builds the copy once
        total_rate(lm, sae, args.feature, 2, params, False)
        print(f"streamed decode on {lm.device}, {args.tokens} tokens, tokens/s summed over the rows (best of {args.repeats}):")
        for rows in (int(r) for r in args.rows.split(",")):
            f = max(total_rate(lm, sae, args.feature, rows, params, False) for _ in range(args.repeats))
            b = max(total_rate(lm, sae, args.feature, rows, params, True) for _ in range(args.repeats))
            print(f"  {rows:3d} rows: float32 {f:6.1f} · bf16 copy {b:6.1f} · ratio {b / f:.2f}x", flush=True)
    finally:
        steering.FAST_MAX_BATCH = old


if __name__ == "__main__":
    main()
