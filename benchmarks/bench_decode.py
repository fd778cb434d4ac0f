"""Single-stream greedy decode speed of the embedded model: unsteered vs paper-mode steered, float32 vs the
bf16 fast-decode unembedding; plus the batch-1 unembedding alone (fp32 / bf16 / int8 dynamic).

The SAE is random (sae-lens TopK, width 4096, layer 5): it only prices the hook, it is not a trained SAE.
Runs are interleaved and repeated; the script prints the median of each and ratios measured in this run.

    nice -n 15 python benchmarks/bench_decode.py [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def random_sae(d_in: int, width: int, layer: int):
    from conftest import make_tiny_sae

    return make_tiny_sae(d_in=d_in, d_sae=width, layer=layer, k=64)


def decode_rate(lm, prompt: str, tokens: int, *, sae=None, fast: bool) -> float:
    from saesteer.steering import _decode_loop, encode_prompts, steer

    ids = encode_prompts(lm, [prompt])
    with lm.lock:
        with steer(lm, sae, [7], [8.0]) if sae is not None else nullcontext():
            t0 = time.perf_counter()
            n = sum(1 for _ in _decode_loop(lm, ids, max_new_tokens=tokens, temperature=0.0, seed=0, fast=fast))
            return n / (time.perf_counter() - t0)


def head_times(lm, repeats: int = 30) -> dict[str, float]:
    """Seconds per batch-1 unembedding (262144 × 640) in each weight format."""
    w = lm.lm_head.weight.detach()
    h = torch.randn(1, w.shape[1])
    heads = {"fp32": lambda: h @ w.T}
    wb = w.to(torch.bfloat16)
    heads["bf16"] = lambda: (h.to(torch.bfloat16) @ wb.T).float()
    try:
        import warnings

        warnings.filterwarnings("ignore", message=".*quantiz", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.clone()
        q = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        heads["int8-dynamic"] = lambda: q(h)
    except Exception as exc:  # the quantization API is optional in some torch builds
        print(f"int8 dynamic quantization unavailable: {exc.__class__.__name__}: {exc}")
    out = {}
    with torch.no_grad():
        for name, fn in heads.items():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from saesteer.models import load_model

    t0 = time.perf_counter()
    lm = load_model()
    print(f"model load: {time.perf_counter() - t0:.1f} s  ({lm.describe()['name']}, {lm.device}, torch threads {torch.get_num_threads()})")
    sae = random_sae(lm.d_model, 4096, 5)
    prompt = "From my experience,"
    configs = {
        "unsteered fp32": dict(sae=None, fast=False),
        "steered   fp32": dict(sae=sae, fast=False),
        "unsteered fast": dict(sae=None, fast=True),
        "steered   fast": dict(sae=sae, fast=True),
    }
    with torch.no_grad():
        decode_rate(lm, prompt, 4, fast=True)  # warm-up: first-call allocations, bf16 head copy
        decode_rate(lm, prompt, 4, fast=False)
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name, kw in configs.items():
            rates[name].append(decode_rate(lm, prompt, args.tokens, **kw))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\ngreedy single-stream decode, {args.tokens} new tokens, median of {args.repeats} (tokens/s):")
    for name, r in med.items():
        print(f"  {name}: {r:6.2f}   runs {', '.join(f'{x:.2f}' for x in rates[name])}")
    print(f"  steered/unsteered fp32: {med['steered   fp32'] / med['unsteered fp32']:.2f}")
    print(f"  fast/fp32 unsteered:    {med['unsteered fast'] / med['unsteered fp32']:.2f}")
    print(f"  fast/fp32 steered:      {med['steered   fast'] / med['steered   fp32']:.2f}")
    print("\nbatch-1 unembedding alone (ms):")
    times = head_times(lm)
    for name, t in times.items():
        print(f"  {name:13s} {t * 1e3:6.1f}   ({times['fp32'] / t:.2f}x fp32)")


if __name__ == "__main__":
    main()
