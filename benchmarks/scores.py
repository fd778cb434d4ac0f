"""Benchmark of the scoring pipeline on the embedded Gemma 3 270M; prints ratios measured in one run.

    nice -n 5 python benchmarks/scores.py [--layer 8] [--ref-features 4] [--seqs 32] [--batches 8] [--part all|output|activations]

1. output score: one-forward-per-feature reference vs the batched KV-cache path (time per feature, ratio);
2. achieved GFLOP/s of the batched pass next to a plain fp32 matmul measured in the same run;
3. activation pass tokens/s next to a bare model forward over the same sequences;
4. peak RSS after scoring every feature; size and load time of the resulting FeatureData.

Uses a bundled SAE when one exists, else a random-direction TopK SAE of width 4096 (it says which).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from saesteer.activations import activation_pass
from saesteer.bundle import pack_sequences
from saesteer.config import SaeSpec, ScoreParams
from saesteer.corpus import iter_bundled
from saesteer.features import FeatureData, build_feature_data
from saesteer.models import load_model
from saesteer.saes import LoadedSae, list_bundled, load_sae
from saesteer.scores import logit_lens, output_score_reference, output_scores
from saesteer.steering import capture_residuals, run_until_stop


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    out = None
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def random_topk_sae(d_model: int, layer: int, width: int = 4096, k: int = 64) -> LoadedSae:
    """Random weights, NOT a trained SAE: unit-norm random decoder rows, encoder scaled to the input width."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    hook = f"blocks.{layer}.hook_resid_post"
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=width, k=k, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn_like(sae.W_dec), dim=-1))
        sae.W_enc.copy_(sae.W_dec.T * d_model**-0.5)
        sae.b_enc.zero_()
    sae.requires_grad_(False)
    return LoadedSae(sae=sae, id=f"random-topk-{width}-L{layer}", hook_name=hook, layer=layer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=8, help="SAE layer (a bundled one when it exists)")
    ap.add_argument("--ref-features", type=int, default=4, help="features timed with the reference")
    ap.add_argument("--seqs", type=int, default=32, help="sequences of 128 tokens per activation-pass batch")
    ap.add_argument("--batches", type=int, default=8, help="activation-pass batches; the second half (past the first 100 sequences, once the top-100 buffers are full) is the steady state")
    ap.add_argument("--part", choices=["all", "output", "activations"], default="all", help="run only one half")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    lm = load_model()
    print(f"model {lm.name}: load {time.perf_counter() - t0:.1f} s, {torch.get_num_threads()} threads, device {lm.device}")
    bundled = list_bundled()
    if bundled:
        entry = next((e for e in bundled if e["layer"] == args.layer), bundled[0])
        sae = load_sae(SaeSpec(source="bundled", sae_id=entry["id"]), lm)
        print(f"SAE: bundled '{sae.id}' (layer {sae.layer}, width {sae.width})")
    else:
        sae = random_topk_sae(lm.d_model, args.layer)
        print(f"SAE: NO bundled SAE yet -> random-direction TopK SAE, width {sae.width}, layer {sae.layer} (random weights, timing only)")
    params = ScoreParams()
    print(f"rss after load: {rss_gb():.2f} GB")

    if args.part != "activations":
        lens, out = bench_output_scores(lm, sae, params, args.ref_features)
    if args.part != "output":
        stats = bench_activations(lm, sae, bundled, args)
    if args.part == "all":
        bench_feature_data(lm, lens, out, stats, bool(bundled))
    print(f"peak RSS overall: {rss_gb():.2f} GB")
    return 0


def bench_output_scores(lm, sae, params, ref_features: int):
    V, d = lm.vocab_size, lm.d_model
    # -- plain matmuls, same process; the square one again after the batched pass (the machine is shared) --
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)

    def square_gflops() -> float:
        timed(lambda: a @ b)
        return 2 * 2048**3 / timed(lambda: a @ b, 3)[0] / 1e9

    gf_before = square_gflops()
    h = torch.randn(params.batch_size, d)
    w = lm.lm_head.weight
    timed(lambda: h @ w.T)
    t_un, _ = timed(lambda: h @ w.T, 2)
    gf_unembed = 2 * params.batch_size * V * d / t_un / 1e9
    print(f"plain fp32 matmul: square 2048^3 {gf_before:.1f} GFLOP/s; unembedding-shaped {params.batch_size}x{d}x{V} {gf_unembed:.1f} GFLOP/s")

    # -- output score: reference vs batched ----------------------------------------------------------------
    feats = np.linspace(0, sae.width - 1, ref_features + 1).astype(int)
    output_score_reference(lm, sae, int(feats[0]), params)  # warm-up
    t_ref = sum(timed(lambda f=f: output_score_reference(lm, sae, int(f), params))[0] for f in feats[1:]) / ref_features
    t_lens, lens = timed(lambda: logit_lens(lm, sae, k=params.top_k))
    print(f"logit lens, all {sae.width} features: {t_lens:.1f} s ({t_lens / sae.width * 1e3:.2f} ms/feature)")
    output_scores(lm, sae, params, features=np.arange(8), lens=lens)  # warm-up
    t_all, out = timed(lambda: output_scores(lm, sae, params, lens=lens))
    t_batched = t_all / sae.width
    peak_scores = rss_gb()
    gf_square = (gf_before + square_gflops()) / 2
    non_embed = sum(p.numel() for n, p in lm.model.named_parameters() if "embed" not in n)
    flops = sae.width * (2 * non_embed + 2 * V * d)  # per row: the blocks for one token + the unembedding
    gf_batched = flops / t_all / 1e9
    ref = output_score_reference(lm, sae, 0, params)
    print(f"output score reference: {t_ref * 1e3:.1f} ms/feature")
    print(f"output score batched ({params.batch_size}/forward, all {sae.width} features): {t_all:.1f} s = {t_batched * 1e3:.2f} ms/feature")
    print(f"  speed-up batched vs reference: {t_ref / t_batched:.1f}x (target >= 30x)")
    print(f"  batched pass {gf_batched:.1f} GFLOP/s = {gf_batched / gf_square:.0%} of the square matmul (mean of before/after), "
          f"{gf_batched / gf_unembed:.0%} of the unembedding-shaped matmul (target >= 50%)")
    print(f"  feature 0: batched {out.score[0]:.6g} vs reference {ref.score:.6g} (rel. diff {abs(out.score[0] - ref.score) / max(ref.score, 1e-30):.1e})")
    print(f"  peak RSS after scoring all features: {peak_scores:.2f} GB (target < 4 GB)")

    return lens, out


def bench_activations(lm, sae, bundled, args):
    # -- activation pass vs a bare forward -----------------------------------------------------------------
    # The first batches of a pass fill the empty top-N buffers (every feature's candidates enter); a real pass
    # over 1e5+ tokens runs almost entirely in the steady state after that, so both are reported.
    n_seq = args.seqs * args.batches
    seqs = list(islice(pack_sequences(lm.tokenizer, iter_bundled("train"), 128), n_seq))
    batches = [seqs[i : i + args.seqs] for i in range(0, n_seq, args.seqs)]
    steady = batches[args.batches // 2 :]
    steady_tokens = sum(len(s) - 1 for b_ in steady for s in b_)
    decoder = lm.model.get_decoder()

    def bare(batch, layer: int | None):
        ids = torch.tensor(batch)
        with torch.no_grad():
            if layer is None:
                decoder(input_ids=ids, use_cache=False)
                return
            with capture_residuals(lm, [layer], stop=True):
                run_until_stop(lambda: decoder(input_ids=ids, use_cache=False))

    def timed_pass(saes_):
        stamps = [time.perf_counter()]
        stats_ = activation_pass(lm, saes_, seqs, batch_size=args.seqs, progress=lambda done, total: stamps.append(time.perf_counter()))
        per_batch = np.diff(stamps)  # (batches,)
        return stats_, per_batch[args.batches // 2 :].sum(), per_batch.sum()

    bare(batches[0], sae.layer)  # warm-up
    t_bare = sum(timed(lambda b_=b_: bare(b_, sae.layer))[0] for b_ in steady)
    t_full = sum(timed(lambda b_=b_: bare(b_, None))[0] for b_ in steady)
    [stats], t_steady, t_whole = timed_pass([sae])
    tps_bare, tps_full, tps_pass = steady_tokens / t_bare, steady_tokens / t_full, steady_tokens / t_steady
    print(f"activation pass, one SAE ({len(seqs)} sequences of 128 in batches of {args.seqs}; steady state = last "
          f"{len(steady)} batches): {tps_pass:.0f} tok/s steady, {sum(len(s) - 1 for s in seqs) / t_whole:.0f} tok/s incl. the first batches")
    print(f"  bare forward to layer {sae.layer}: {tps_bare:.0f} tok/s -> pass at {tps_pass / tps_bare:.0%} (target >= 80%)")
    print(f"  bare forward, all {lm.n_layers} layers: {tps_full:.0f} tok/s -> pass at {tps_pass / tps_full:.0%}")

    if len(bundled) > 1:  # the bundle's use: every SAE of the model in one pass, stopped after the deepest layer
        saes = [load_sae(SaeSpec(source="bundled", sae_id=e["id"]), lm) for e in bundled]
        deepest = max(s.layer for s in saes)
        t_bare_all = sum(timed(lambda b_=b_: bare(b_, deepest))[0] for b_ in steady)
        _, t_steady_all, _ = timed_pass(saes)
        print(f"activation pass, all {len(saes)} bundled SAEs at once: {steady_tokens / t_steady_all:.0f} tok/s steady; bare forward "
              f"to layer {deepest}: {steady_tokens / t_bare_all:.0f} tok/s -> pass at {t_bare_all / t_steady_all:.0%} (target >= 80%)")

    return stats


def bench_feature_data(lm, lens, out, stats, is_bundled: bool) -> None:
    """Size and load time of the FeatureData from the short pass above (its contexts come from few tokens)."""
    data = build_feature_data(lm, lens, out, stats, {"benchmark": True, "random_sae": not is_bundled})
    with tempfile.TemporaryDirectory() as tmp:
        data.save(tmp)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        t_load, loaded = timed(lambda: FeatureData.load(tmp))
        t_card, _ = timed(lambda: (loaded.contexts(int(np.argmax(loaded.table.n_contexts))), loaded.output_details(0)))
    print(f"FeatureData ({stats.n_tokens} tokens of contexts): {size / 1e6:.1f} MB on disk, load {t_load:.2f} s (target < 2 s), "
          f"one feature card {t_card * 1e3:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
