"""Benchmark of the scoring pipeline on the embedded Gemma 3 270M; prints ratios measured in one run.

    nice -n 5 python benchmarks/scores.py [--layer 8] [--ref-features 4] [--seqs 32] [--batches 8] [--part all|output|activations]

1. output score: one-forward-per-feature reference vs the batched KV-cache path (time per feature, ratio);
2. achieved GFLOP/s of the batched pass next to a plain fp32 matmul measured in the same run;
3. activation pass tokens/s next to a bare model forward over the same sequences;
4. peak RSS after scoring every feature; size and load time of the resulting FeatureData;
5. (``--part ratios``, also in ``all``) the issue-16 targets: the logit lens of every feature against the plain
   matmul of the same shape (4096 × 640 × 262144 in the lens' own 256-row blocks, each block timed next to the
   lens of that block), and the whole CLI run ``scores --layer L --all --only output --no-cache`` (a subprocess,
   model load included) against the reference (one full forward per feature, measured on ``--ref-features``
   features half before and half after the CLI run, extrapolated per feature to the whole SAE).

Uses a bundled SAE when one exists, else a random-direction TopK SAE of width 4096 (it says which).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from saesteer.activations import activation_pass
from saesteer.config import SaeSpec, ScoreParams
from saesteer.corpus import iter_bundled, pack_sequences
from saesteer.features import FeatureData, build_feature_data
from saesteer.models import load_model
from saesteer.saes import LoadedSae, list_bundled, load_sae
from saesteer.scores import (
    OutputScoreResult,
    logit_lens,
    output_score_reference,
    output_scores,
)
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
    ap.add_argument("--ref-features", type=int, default=8, help="reference features, spread over the batches")
    ap.add_argument("--seqs", type=int, default=32, help="sequences of 128 tokens per activation-pass batch")
    ap.add_argument("--batches", type=int, default=8, help="activation-pass batches; the second half (past the first 100 sequences, once the top-100 buffers are full) is the steady state")
    ap.add_argument("--batch-size", type=int, default=ScoreParams().batch_size, help="features per forward of the output score")
    ap.add_argument("--part", choices=["all", "output", "activations", "ratios", "lens-ratio", "cli-ratio"], default="all",
                    help="run only one part (ratios = lens-ratio + cli-ratio)")
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
    params = ScoreParams(batch_size=args.batch_size)
    print(f"rss after load: {rss_gb():.2f} GB")

    if args.part in ("all", "ratios", "lens-ratio", "cli-ratio"):
        bench_ratios(lm, sae, params, args.ref_features, lens=args.part != "cli-ratio", cli=args.part != "lens-ratio")
    if "ratio" in args.part:
        return 0
    if args.part != "activations":
        lens, out = bench_output_scores(lm, sae, params, args.ref_features)
    if args.part != "output":
        stats = bench_activations(lm, sae, bundled, args)
    if args.part == "all":
        bench_feature_data(lm, lens, out, stats, bool(bundled))
    print(f"peak RSS overall: {rss_gb():.2f} GB")
    return 0


def bench_ratios(lm, sae, params, ref_features: int, lens: bool = True, cli: bool = True) -> None:
    """Logit lens vs its matmul, block by block; the CLI run vs the reference, extrapolated per feature."""
    if lens:
        bench_lens_ratio(lm, sae, params)
    if cli:
        bench_cli_ratio(lm, sae, params, ref_features)


def bench_lens_ratio(lm, sae, params) -> None:
    from saesteer.scores import _wide

    w = lm.lm_head.weight
    blocks = np.array_split(np.arange(sae.width), max(1, sae.width // 256))
    logit_lens(lm, sae, k=params.top_k, features=blocks[0])  # warm-up
    t_lens = t_mm = 0.0
    for block in blocks:
        t_lens += timed(lambda b=block: logit_lens(lm, sae, k=params.top_k, features=b))[0]
        h = lm.final_norm(sae.directions(torch.from_numpy(block)).to(lm.device, lm.dtype))
        with torch.no_grad():
            t_mm += timed(lambda h=h: _wide(h @ w.T))[0]
    print(f"logit lens, all {sae.width} features: {t_lens:.1f} s; plain matmul {sae.width} x {lm.d_model} x {lm.vocab_size} in the same "
          f"blocks: {t_mm:.1f} s -> lens / matmul {t_lens / t_mm:.2f}x (target <= 2x)")


def bench_cli_ratio(lm, sae, params, ref_features: int) -> None:
    import os
    import subprocess

    spread = np.linspace(0, sae.width - 1, max(ref_features, 2)).astype(int)
    output_score_reference(lm, sae, int(spread[0]), params)  # warm-up
    ref_t = [timed(lambda f=int(f): output_score_reference(lm, sae, f, params))[0] for f in spread[: len(spread) // 2]]
    src = str(Path(__file__).resolve().parents[1] / "src")
    cmd = [sys.executable, "-m", "saesteer", "scores", "--layer", str(sae.layer), "--all", "--only", "output", "--no-cache"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True)
    t_cli = time.perf_counter() - start
    print(f"CLI run done: {t_cli:.1f} s", flush=True)
    if done.returncode != 0:
        print(f"CLI run failed ({done.returncode}): {done.stderr[-500:]}")
        return
    ref_t += [timed(lambda f=int(f): output_score_reference(lm, sae, f, params))[0] for f in spread[len(spread) // 2 :]]
    per_ref = float(np.median(ref_t))
    print(f"CLI `{' '.join(cmd[1:])}`: {t_cli:.1f} s end to end ({t_cli / sae.width * 1e3:.1f} ms/feature, model load included)")
    print(f"reference (logit lens + one full forward per feature): median {per_ref * 1e3:.0f} ms/feature over {len(ref_t)} features "
          f"(range {min(ref_t) * 1e3:.0f}-{max(ref_t) * 1e3:.0f}), x {sae.width} = {per_ref * sae.width:.0f} s extrapolated "
          f"-> CLI run {per_ref * sae.width / t_cli:.1f}x faster than the reference (target >= 30x)")


def bench_output_scores(lm, sae, params, ref_features: int):
    """Each batch of features is timed next to one reference feature and the plain matmuls, so every ratio
    comes from measurements seconds apart (the shared machine's load drifts over minutes)."""
    V, d = lm.vocab_size, lm.d_model
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    h, w = torch.randn(params.batch_size, d), lm.lm_head.weight
    timed(lambda: a @ b)
    timed(lambda: h @ w.T)

    t_lens, lens = timed(lambda: logit_lens(lm, sae, k=params.top_k))
    print(f"logit lens, all {sae.width} features: {t_lens:.1f} s ({t_lens / sae.width * 1e3:.2f} ms/feature)")
    output_scores(lm, sae, params, features=np.arange(8), lens=lens)  # warm-up
    output_score_reference(lm, sae, 0, params)
    non_embed = sum(p.numel() for n, p in lm.model.named_parameters() if "embed" not in n)
    chunks = np.array_split(np.arange(sae.width), max(1, sae.width // params.batch_size))
    ref_every = max(1, len(chunks) // max(ref_features, 1))
    rows, parts = [], []
    for i, chunk in enumerate(chunks):
        t_batch, part = timed(lambda c=chunk: output_scores(lm, sae, params, features=c, lens=lens.subset(c)))
        parts.append(part)
        t_ref = timed(lambda f=int(chunk[0]): output_score_reference(lm, sae, f, params))[0] if i % ref_every == 0 else math.nan
        t_sq = timed(lambda: a @ b)[0]
        t_un = timed(lambda: h @ w.T)[0]
        flops = len(chunk) * (2 * non_embed + 2 * V * d)  # per row: the blocks for one token + the unembedding
        rows.append((t_batch / len(chunk), t_ref, flops / t_batch / 1e9, 2 * 2048**3 / t_sq / 1e9, 2 * params.batch_size * V * d / t_un / 1e9))
    peak_scores = rss_gb()
    per_feat, ref, gf, gf_sq, gf_un = map(np.array, zip(*rows))
    has_ref = ~np.isnan(ref)
    ratio = ref[has_ref] / per_feat[has_ref]
    print(f"output score reference: {np.median(ref[has_ref]) * 1e3:.0f} ms/feature (median of {has_ref.sum()}, each next to a batch)")
    print(f"output score batched ({params.batch_size}/forward, all {sae.width} features): {per_feat.sum() * params.batch_size:.0f} s "
          f"in {len(chunks)} batches, median {np.median(per_feat) * 1e3:.1f} ms/feature")
    print(f"  speed-up batched vs reference (adjacent pairs): median {np.median(ratio):.0f}x, range {ratio.min():.0f}-{ratio.max():.0f}x (target >= 30x)")
    print(f"  batched pass: median {np.median(gf):.1f} GFLOP/s; plain fp32 matmul next to each batch: square 2048^3 median "
          f"{np.median(gf_sq):.1f}, unembedding-shaped {params.batch_size}x{d}x{V} median {np.median(gf_un):.1f} GFLOP/s")
    print(f"  batched / square matmul per batch: median {np.median(gf / gf_sq):.0%}; batched / unembedding-shaped: median "
          f"{np.median(gf / gf_un):.0%} (target >= 50%)")
    out = OutputScoreResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("features", "score", "min_rank", "max_prob",
                                                                                         "token_ids", "ranks", "probs")),
                            parts[0].added_activation, parts[0].vocab_size, parts[0].rank_cap)
    check = output_score_reference(lm, sae, 0, params)
    print(f"  feature 0: batched {out.score[0]:.6g} vs reference {check.score:.6g} (rel. diff {abs(out.score[0] - check.score) / max(check.score, 1e-30):.1e})")
    print(f"  peak RSS after scoring all features: {peak_scores:.2f} GB (target < 4 GB)")
    return lens, out


def bench_activations(lm, sae, bundled, args):
    """The bare forwards of each batch run right before the pass processes that batch (inside the sequence
    generator it reads), so each batch's ratio comes from adjacent measurements. The first batches fill the
    empty top-N buffers (every candidate enters); the second half is the steady state of a long pass."""
    n_seq = args.seqs * args.batches
    seqs = list(islice(pack_sequences(lm.tokenizer, iter_bundled("train"), 128), n_seq))
    batches = [seqs[i : i + args.seqs] for i in range(0, n_seq, args.seqs)]
    decoder = lm.model.get_decoder()

    def bare(batch, layer: int | None):
        ids = torch.tensor(batch)
        with torch.no_grad():
            if layer is None:
                decoder(input_ids=ids, use_cache=False)
                return
            with capture_residuals(lm, [layer], stop=True):
                run_until_stop(lambda: decoder(input_ids=ids, use_cache=False))

    def interleaved(saes_, layer: int, full: bool):
        bare_t, full_t = [], []

        def feed():
            for batch in batches:
                bare_t.append(timed(lambda b_=batch: bare(b_, layer))[0])
                full_t.append(timed(lambda b_=batch: bare(b_, None))[0] if full else math.nan)
                yield from batch

        stamps = [time.perf_counter()]
        stats_ = activation_pass(lm, saes_, feed(), batch_size=args.seqs, progress=lambda done, total: stamps.append(time.perf_counter()))
        bare_t, full_t = np.array(bare_t), np.array(full_t)
        pass_t = np.diff(stamps) - bare_t - np.nan_to_num(full_t)
        tokens = np.array([sum(len(s) - 1 for s in b_) for b_ in batches])
        half = slice(args.batches // 2, None)
        return stats_, tokens, pass_t, bare_t, full_t, half

    bare(batches[0], sae.layer)  # warm-up
    [stats], tokens, pass_t, bare_t, full_t, half = interleaved([sae], sae.layer, full=True)
    print(f"activation pass, one SAE ({len(seqs)} sequences of 128 in batches of {args.seqs}; steady state = last {args.batches - args.batches // 2} batches):")
    print(f"  pass {np.median(tokens[half] / pass_t[half]):.0f} tok/s, bare forward to layer {sae.layer} {np.median(tokens[half] / bare_t[half]):.0f} tok/s, "
          f"all {lm.n_layers} layers {np.median(tokens[half] / full_t[half]):.0f} tok/s (medians per batch)")
    print(f"  pass / bare forward to layer {sae.layer}, per batch: steady median {np.median(bare_t[half] / pass_t[half]):.0%} "
          f"(target >= 80%), first batches {', '.join(f'{r:.0%}' for r in (bare_t / pass_t)[: args.batches // 2])}; "
          f"pass / full forward: median {np.median(full_t[half] / pass_t[half]):.0%}")
    if len(bundled) > 1:  # the bundle's use: every SAE of the model in one pass, stopped after the deepest layer
        saes = [load_sae(SaeSpec(source="bundled", sae_id=e["id"]), lm) for e in bundled]
        deepest = max(s.layer for s in saes)
        _, tokens, pass_t, bare_t, _, half = interleaved(saes, deepest, full=False)
        print(f"activation pass, all {len(saes)} bundled SAEs at once: {np.median(tokens[half] / pass_t[half]):.0f} tok/s steady; "
              f"bare forward to layer {deepest}: {np.median(tokens[half] / bare_t[half]):.0f} tok/s; per batch steady median "
              f"{np.median(bare_t[half] / pass_t[half]):.0%} (target >= 80%), first batches "
              f"{', '.join(f'{r:.0%}' for r in (bare_t / pass_t)[: args.batches // 2])}")
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
