"""``build-bundle``: train SAEs for the embedded model with sae-lens and measure their quality."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ModelSpec, TrainParams
from . import USER_ERRORS, fail
from .flags import Flag, add_flags, build, integer, integers, number, text


#: The TrainParams fields the command line sets.
FLAGS = (
    Flag("layers", integers(low=0), many=True),
    Flag("width", integer()),
    Flag("k", integer()),
    Flag("tokens", integer()),
    Flag("epochs", number(positive=True)),
    Flag("batch_size", integer()),
    Flag("lr", number(positive=True)),
    Flag("seed", integer()),
    Flag("heldout_tokens", integer()),
)
DEVICE_FLAGS = (Flag("device", text()),)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, TrainParams, FLAGS)
    add_flags(p, ModelSpec, DEVICE_FLAGS)
    p.add_argument("--out", type=Path, default=Path("work/bundle/saes"), help="where SAEs + manifest.json go "
                   "(assets/saes/gemma-3-270m replaces the shipped ones; other layers' manifest entries are kept)")
    p.add_argument("--work", type=Path, default=Path("work/bundle/work"), help="activation shards and checkpoints (resumable)")


def run(args: argparse.Namespace) -> int:
    from ..bundle import build_bundle, tokenize_corpus
    from ..corpus import corpus_hash, iter_bundled
    from ..models import load_model

    try:
        params = build(TrainParams, args, FLAGS)
        lm = load_model(build(ModelSpec, args, DEVICE_FLAGS))
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
