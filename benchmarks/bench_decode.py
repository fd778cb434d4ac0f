"""Live decode speed of the embedded model: single stream, float32 vs fast (a bf16 copy of the whole model),
unsteered and paper-mode steered; and the side-by-side pair (baseline + steered as one 2-row batch, what the
Steering lab streams), in tokens/s per column.

The SAE is random (sae-lens TopK, width 4096, layer 5): it only prices the hook, it is not a trained SAE.
Decoding goes through the library's own loop (``_decoding`` + ``_decode_loop``: lock, model choice, hook,
KV cache), greedy, without detokenization. Runs are interleaved and repeated; the script prints the median
of each, ratios measured in this run, the one-off cost of the bf16 copy, and how many leading greedy tokens
the fast path shares with float32.

    nice -n 15 python benchmarks/bench_decode.py [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FEATURE, STRENGTH = 7, 8.0


def random_sae(d_in: int, width: int, layer: int):
    from conftest import make_tiny_sae

    return make_tiny_sae(d_in=d_in, d_sae=width, layer=layer, k=64)


def decode(lm, prompt: str, tokens: int, *, sae=None, rows: int = 1, fast: bool) -> tuple[float, list[list[int]]]:
    """(decode steps per second, tokens of every row). rows=2: row 0 strength 0 (baseline), row 1 steered."""
    from saesteer.steering import _decode_loop, _decoding, encode_prompts

    ids = encode_prompts(lm, [prompt]) * rows
    features = [FEATURE] if sae is not None else []
    strengths = torch.tensor([[0.0], [STRENGTH]] if rows == 2 else [[STRENGTH]])[:, : len(features)]  # (rows, n_features)
    with _decoding(lm, sae, features, strengths, "paper", rows, fast) as model:
        t0 = time.perf_counter()
        steps = list(_decode_loop(lm, ids, max_new_tokens=tokens, temperature=0.0, seed=0, model=model))
        rate = len(steps) / (time.perf_counter() - t0)
    return rate, torch.stack(steps, dim=1).tolist()


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from saesteer.models import load_model
    from saesteer.steering import fast_model

    t0 = time.perf_counter()
    lm = load_model()
    print(f"model load: {time.perf_counter() - t0:.1f} s  ({lm.describe()['name']}, {lm.device}, torch threads {torch.get_num_threads()})")
    t0 = time.perf_counter()
    fast = fast_model(lm)
    extra = sum(p.numel() * p.element_size() for p in fast.parameters())
    print(f"bf16 copy of the whole model: built in {time.perf_counter() - t0:.1f} s, {extra / 1e9:.2f} GB extra (made once per model)")
    sae = random_sae(lm.d_model, 4096, 5)
    prompt = "From my experience,"
    configs = {
        "single unsteered fp32": {"sae": None, "fast": False},
        "single steered   fp32": {"sae": sae, "fast": False},
        "single unsteered fast": {"sae": None, "fast": True},
        "single steered   fast": {"sae": sae, "fast": True},
        "pair (2 rows)    fp32": {"sae": sae, "rows": 2, "fast": False},
        "pair (2 rows)    fast": {"sae": sae, "rows": 2, "fast": True},
    }
    with torch.no_grad():
        for kw in configs.values():  # warm-up: first-call allocations of each shape and model
            decode(lm, prompt, 4, **kw)
    rates: dict[str, list[float]] = {k: [] for k in configs}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, kw in configs.items():
            rate, toks = decode(lm, prompt, args.tokens, **kw)
            rates[name].append(rate)
            tokens[name] = toks
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\ngreedy decode, {args.tokens} new tokens, median of {args.repeats} (tokens/s; for a pair, per column):")
    for name, r in med.items():
        print(f"  {name}: {r:6.2f}   runs {', '.join(f'{x:.2f}' for x in rates[name])}")
    print(f"  fast/fp32 single unsteered: {med['single unsteered fast'] / med['single unsteered fp32']:.2f}")
    print(f"  fast/fp32 single steered:   {med['single steered   fast'] / med['single steered   fp32']:.2f}")
    print(f"  steered/unsteered fast:     {med['single steered   fast'] / med['single unsteered fast']:.2f}")
    print(f"  pair/single steered fast:   {med['pair (2 rows)    fast'] / med['single steered   fast']:.2f}  (per column; both columns at once)")
    print(f"  pair/single steered fp32:   {med['pair (2 rows)    fp32'] / med['single steered   fp32']:.2f}")
    print("\ngreedy agreement (leading tokens equal, of the tokens decoded):")
    print(f"  fast vs fp32, unsteered: {shared_prefix(tokens['single unsteered fast'][0], tokens['single unsteered fp32'][0])}")
    print(f"  fast vs fp32, steered:   {shared_prefix(tokens['single steered   fast'][0], tokens['single steered   fp32'][0])}")
    pair32, pairf = tokens["pair (2 rows)    fp32"], tokens["pair (2 rows)    fast"]
    print(f"  pair fp32 rows == single fp32 runs: {pair32[0] == tokens['single unsteered fp32'][0] and pair32[1] == tokens['single steered   fp32'][0]}")
    print(f"  pair fast rows == single fast runs: {pairf[0] == tokens['single unsteered fast'][0] and pairf[1] == tokens['single steered   fast'][0]}"
          " (not guaranteed: bf16 kernels may round batch 1 and batch 2 differently)")


if __name__ == "__main__":
    main()
