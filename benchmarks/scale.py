"""Ray scaling on this machine: the same output-score job on a local Ray cluster with 1 worker and with 2 workers,
and locally without Ray; prints times and ratios measured in one run.

    nice -n 5 python benchmarks/scale.py [--layer 11] [--features 1024] [--only output|all] [--tokens 8192]

The job: the logit lens and output scores of ``--features`` features (chunks of 512, one task each; with
``--only all`` also an activation pass over ``--tokens`` corpus tokens, in shards of 16 sequences) of a copy
of the bundled SAE at ``--layer`` cut to its first latents (saved to a temporary sae-lens directory that the
workers load; the per-feature cost is that of the full SAE's features). Each configuration scores into its own empty cache, after a warm-up that has both workers load the
model and SAE (a worker keeps them for every later task), so the times are the steady state of a long job:

- 1 worker: tasks reserve both CPUs and use 2 torch threads (one task at a time);
- 2 workers: tasks reserve 1 CPU each and use 1 torch thread (two at a time);
- local: ``features.compute_many`` in this process (2 threads), no Ray.

Other jobs share this machine: the ratios hold better than the times, and the load at start and end is printed.
The per-feature cost is printed too, extrapolated to Gemma Scope 2 270M ``res-all`` (72 SAEs, 10.0M features).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from saesteer import distributed
from saesteer.corpus import iter_bundled, pack_sequences
from saesteer.config import ModelSpec, SaeSpec, ScoreParams
from saesteer.features import compute_many
from saesteer.models import load_model
from saesteer.saes import load_sae
from saesteer.store import Store

RES_ALL_FEATURES = 18 * 2 * (16384 + 262144)  # layers x L0 variants x (16k + 262k)


def cut(sae, n: int, directory: str) -> SaeSpec:
    """A TopK SAE made of the first ``n`` latents of ``sae``, saved where every worker of this machine loads it."""
    from sae_lens import TopKSAE, TopKSAEConfig

    s = sae.sae
    cfg = TopKSAEConfig(d_in=s.cfg.d_in, d_sae=n, k=min(s.cfg.k, n), metadata=s.cfg.metadata)
    small = TopKSAE(cfg)
    with torch.no_grad():
        small.W_enc.copy_(s.W_enc[:, :n])
        small.W_dec.copy_(s.W_dec[:n])
        small.b_enc.copy_(s.b_enc[:n])
        small.b_dec.copy_(s.b_dec)
    small.save_model(directory)
    return SaeSpec(source="local", path=directory)


def _warm(loader, ref, pause: float) -> int:
    """In a worker: load the model and the SAE (kept by the worker for later tasks), then hold the CPU slot a
    moment so that the next warm-up lands on another worker."""
    distributed._worker_objects(loader, ref)
    time.sleep(pause)
    return os.getpid()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--features", type=int, default=1024, help="score a copy of the SAE cut to its first N latents (timing only; >= 1024 so that 2 workers share it)")
    ap.add_argument("--only", choices=["output", "all"], default="output")
    ap.add_argument("--tokens", type=int, default=8192, help="corpus tokens of the activation pass (--only all)")
    args = ap.parse_args(argv)

    print(f"load at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    spec = ModelSpec()
    lm = load_model(spec)
    full = load_sae(SaeSpec(source="bundled", layer=args.layer), lm)
    tmp_sae = tempfile.TemporaryDirectory()
    sae_spec = cut(full, args.features, tmp_sae.name)
    sae = load_sae(sae_spec, lm)
    n = sae.width
    print(f"SAE: the first {n} latents of '{full.id}' as a TopK SAE of their own (a sliced copy: timing only, not its scores)")
    params = ScoreParams()
    seqs = list(pack_sequences(lm.tokenizer, iter_bundled("train"), 128)) if args.only == "all" else None
    ray = distributed.connect(distributed.ClusterParams(num_cpus=2))
    loader = distributed.SpecLoader(spec)
    warm = ray.remote(_warm).options(num_cpus=1)
    pids = ray.get([warm.remote(loader, sae_spec, 5.0) for _ in range(2)])
    print(f"warm-up: model and SAE loaded in worker processes {sorted(set(pids))}")

    def job(cpus_per_task: float, store_dir: str):
        cluster = distributed.ClusterParams(num_cpus=2, cpus_per_task=cpus_per_task, shard_sequences=16)
        start = time.perf_counter()
        _, report = distributed.run_job(lm, [sae], [sae_spec], loader, seqs, params, args.tokens, args.only,
                                        Store(store_dir), "bundled", cluster)
        return time.perf_counter() - start, report

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cpus in (("2 workers", 1.0), ("1 worker", 2.0)):
            times[name], report = job(cpus, f"{tmp}/{name}")
            print(f"{name}: {times[name]:.1f} s for {n} features ({report.submitted} tasks on {len(report.pids)} worker process(es), "
                  f"model loads per worker {sorted(report.model_loads.values())})")
        start = time.perf_counter()
        compute_many(lm, [sae], seqs, params, args.tokens, only=args.only, store=Store(f"{tmp}/local"), use_bundled=False)
        times["local"] = time.perf_counter() - start
        print(f"local (no Ray, {torch.get_num_threads()} threads): {times['local']:.1f} s")
    ray.shutdown()
    print(f"ratio 1 worker / 2 workers: {times['1 worker'] / times['2 workers']:.2f}x (2 workers faster when > 1); "
          f"local / 2 workers: {times['local'] / times['2 workers']:.2f}x")
    per = times["2 workers"] / n
    print(f"per feature on this machine (2 workers, both CPUs, --only {args.only}): {per * 1e3:.1f} ms -> Gemma Scope 2 270M res-all "
          f"({RES_ALL_FEATURES:,} features): {per * RES_ALL_FEATURES / 3600:.1f} h on this 2-CPU machine, "
          f"{2 * per * RES_ALL_FEATURES / 3600:.1f} CPU-hours")
    print(f"load at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
