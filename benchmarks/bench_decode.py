"""Live decode speed of the embedded model: single stream, float32 vs fast (a bf16 copy of the whole model),
unsteered and paper-mode steered; and the side-by-side pair (baseline + steered as one 2-row batch, what the
Steering lab streams), in tokens/s per column.

The SAE is random (sae-lens TopK, width 4096, layer 5): it only prices the hook, it is not a trained SAE.
Decoding goes through the library's own loop (``_decoding`` + ``_decode_loop``: lock, model choice, hook,
KV cache), greedy, without detokenization. Runs are interleaved and repeated; the script prints the median
of each, ratios measured in this run, the one-off cost of the bf16 copy, and how many leading greedy tokens
the fast path shares with float32. Greedy fast decoding takes its tokens from the int4-screened float32 head
(``saesteer.fasthead``); the last block counts how often that head, and a plain bf16 head, pick the float32
head's token on held-out text.

    nice -n 15 python benchmarks/bench_decode.py [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

FEATURE, STRENGTH = 7, 8.0


def random_sae(d_in: int, width: int, layer: int):
    from saesteer.testing import make_tiny_sae

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
    head_agreement(lm)


def head_agreement(lm, n_seqs: int = 16) -> None:
    """Next-token argmax at held-out corpus positions: the fast path's int4-screened head and a plain bf16
    head, both on the bf16 copy's hidden states, against the float32 head on the same states; and the
    batch-1 time of each head."""
    from itertools import islice

    import torch.nn.functional as F

    from saesteer.corpus import pack_sequences
    from saesteer.corpus import iter_bundled
    from saesteer.fasthead import available, screened_head
    from saesteer.steering import fast_model

    if not available(lm.device):
        print("\nint4 kernels unavailable here: the fast path uses the bf16 head")
        return
    fast = fast_model(lm)
    head = screened_head(lm.model, lm.lm_head.weight)
    seqs = list(islice(pack_sequences(lm.tokenizer, iter_bundled("heldout"), 128), n_seqs))
    with torch.no_grad():
        hidden = fast.get_decoder()(input_ids=torch.tensor(seqs)).last_hidden_state[:, 1:].reshape(-1, lm.d_model)
        w32, w16 = lm.lm_head.weight.float(), fast.lm_head.weight
        exact = torch.cat([(h.float() @ w32.T).argmax(-1) for h in hidden.split(256)])
        screened = torch.cat([head.argmax(h) for h in hidden.split(256)])
        bf16 = torch.cat([F.linear(h, w16).float().argmax(-1) for h in hidden.split(256)])

        def ms(fn, n: int = 20) -> float:
            fn()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return 1000 * statistics.median(ts)

        h1 = hidden[:1]
        times = {"fp32": ms(lambda: h1.float() @ w32.T), "bf16": ms(lambda: F.linear(h1, w16)), "int4-screened": ms(lambda: head.argmax(h1))}
    n = len(hidden)
    print(f"\nnext-token argmax on {n} held-out positions (bf16 copy's hidden states) vs the float32 head:")
    print(f"  int4-screened head (fast path, {head.candidates} candidates rescored in fp32): {int((screened == exact).sum())}/{n} equal")
    print(f"  plain bf16 head:                                          {int((bf16 == exact).sum())}/{n} equal")
    print("  batch-1 head time (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
