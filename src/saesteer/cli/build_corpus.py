"""``build-corpus``: rebuild assets/corpus/prose.jsonl.xz from text installed by Debian packages."""

from __future__ import annotations

import argparse
import json

from . import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..corpus import BUNDLED_CORPUS, CorpusError, build_offline_corpus, corpus_hash

    try:
        stats = build_offline_corpus(seed=args.seed)
    except CorpusError as exc:
        return fail(str(exc))
    print(json.dumps(stats, indent=2))
    print(f"wrote {BUNDLED_CORPUS} (sha256/16 {corpus_hash()})")
    return 0
