"""``build-bundle``: train SAEs for the embedded model with sae-lens and measure their quality."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import USER_ERRORS, fail


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from exc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_layers, default=(2, 5, 8, 11, 14, 17), help="comma-separated layers (default 2,5,8,11,14,17)")
    p.add_argument("--width", type=int, default=4096, help="SAE width d_sae (default 4096)")
    p.add_argument("--k", type=int, default=64, help="TopK sparsity (default 64)")
    p.add_argument("--tokens", type=int, default=2_700_000, help="corpus tokens whose activations are collected")
    p.add_argument("--epochs", type=float, default=5.0, help="passes over the collected activations (default 5)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-tokens", type=int, default=140_000, help="held-out tokens for the metrics (>= 100k for dead features)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--out", type=Path, default=Path("work/bundle/saes"), help="where SAEs + manifest.json go "
                   "(assets/saes/gemma-3-270m replaces the shipped ones; other layers' manifest entries are kept)")
    p.add_argument("--work", type=Path, default=Path("work/bundle/work"), help="activation shards and checkpoints (resumable)")


def run(args: argparse.Namespace) -> int:
    from ..bundle import build_bundle, tokenize_corpus
    from ..config import ModelSpec, TrainParams
    from ..corpus import corpus_hash, iter_bundled
    from ..models import load_model

    try:
        params = TrainParams(layers=args.layers, width=args.width, k=args.k, tokens=args.tokens, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed, heldout_tokens=args.heldout_tokens)
        lm = load_model(ModelSpec(device=args.device))
        bad = [l for l in params.layers if not 0 <= l < lm.n_layers]
        if bad:
            return fail(f"layers {bad} do not exist: the model has layers 0..{lm.n_layers - 1}")
        train = tokenize_corpus(lm.tokenizer, iter_bundled("train"), params.tokens, params.context_size)
        held = tokenize_corpus(lm.tokenizer, iter_bundled("heldout"), params.heldout_tokens, params.context_size)
        manifest = build_bundle(lm, params, train, held, args.out, args.work, corpus_id=corpus_hash())
    except USER_ERRORS as exc:
        return fail(str(exc))
    print(json.dumps({e["id"]: e["metrics"] for e in manifest["saes"]}, indent=2))
    print(f"wrote {args.out / 'manifest.json'}")
    return 0
