"""``python -m saesteer scores``: output/input scores and activation statistics of an SAE's features."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..config import ClusterParams, ScoreParams
from . import USER_ERRORS, add_model_and_sae_args, fail, specs_from_args
from .flags import Flag, add_flags, build, integer, number

#: The ScoreParams fields the command line sets.
FLAGS = (Flag("batch_size", integer()), Flag("amp", number()))
#: The ClusterParams fields the command line sets (with --ray).
RAY_FLAGS = (Flag("num_cpus", integer(1), flag="--ray-cpus"), Flag("max_retries", integer(0), flag="--ray-retries"),
             Flag("shard_sequences", integer(1), flag="--ray-shard-sequences"), Flag("group_width", integer(1), flag="--ray-group-width"))
ONLY = ("all", "output", "input")
SHOWN = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_sae_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--features", default=None, help="feature ids, e.g. 1,2,3 or 10-20 (default: all)")
    which.add_argument("--all", action="store_true", help="every feature of the SAE (the default)")
    p.add_argument("--only", choices=ONLY, default="all",
                   help="output: output score only (no corpus pass); input: input score and activation statistics only")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--out", default=None, help="write one row per feature to FILE.csv or FILE.parquet")
    p.add_argument("--save", default=None, metavar="DIR", help="also save the full feature data (contexts, histograms) to DIR")
    p.add_argument("--corpus", default="bundled", help="'bundled' (offline corpus, train split) or text files (.txt/.jsonl/.parquet, comma-separated)")
    p.add_argument("--tokens", type=int, default=None, help="corpus tokens for the activation pass (default 200000)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per corpus sequence, BOS included")
    add_flags(p, ScoreParams, FLAGS)
    many = p.add_argument_group("many SAEs at once (each saved where the app reads it)")
    many.add_argument("--layers", default=None, help="bundled SAEs at these layers, e.g. 2,5,8 or 0-17; with --release, that release's SAEs at these layers")
    many.add_argument("--release", default=None, help="a sae-lens release, e.g. gemma-scope-2-270m-pt-res-all (with --ids and/or --layers)")
    many.add_argument("--ids", default=None, metavar="PATTERN", help="SAE ids of --release matching this shell pattern, e.g. 'layer_*_width_16k_*'")
    many.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                      help="run on a Ray cluster: no ADDRESS starts a local one on this machine; else HOST:PORT of `ray start --head`, ray://HOST:PORT or auto")
    add_flags(many, ClusterParams, RAY_FLAGS)


def parse_features(text: str) -> list[int]:
    """'1,2,5-7' -> [1, 2, 5, 6, 7]; raises ValueError naming the bad part."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--features: {part!r} is not a feature id or range; use e.g. 1,2,3 or 10-20")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--features: range {part!r} is empty; write the smaller id first")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


def write_failed(flag: str, path, exc: OSError, no_cache: bool) -> int:
    """The one-line error for an output that could not be written after the job ran."""
    again = ("--no-cache: nothing was cached, so a rerun computes the scores again" if no_cache else
             "the scores are computed and in the feature cache: rerun with a writable path to write them without recomputing")
    return fail(f"{flag}: could not write {path} ({exc.__class__.__name__}: {exc.strerror or exc}); {again}")


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags that need no model (``--tokens``, ``--context-size``, ``--out``, the score parameters)."""
    from ..config import ConfigError, ScoreParams

    if args.tokens is not None and args.tokens < 1:
        raise ConfigError(f"--tokens must be a positive number of tokens, got {args.tokens}")
    if args.context_size < 2:
        raise ConfigError(f"--context-size must be at least 2 (BOS plus one token), got {args.context_size}")
    if args.out is not None:
        out = Path(args.out)
        if out.suffix not in (".csv", ".parquet"):
            raise ConfigError(f"--out {args.out}: use a .csv or .parquet file name")
        if not out.parent.exists():
            raise ConfigError(f"--out {args.out}: directory {out.parent} does not exist")
    build(ScoreParams, args, FLAGS)


class Bars:
    """One tqdm bar per stage, created on first report."""

    def __init__(self):
        self.bars = {}
        self.done: set[str] = set()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        from tqdm.auto import tqdm

        if stage in self.done:
            return
        bar = self.bars.get(stage)
        if bar is None:
            unit = "tok" if stage == "activations" else "feat"
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=unit, unit_scale=stage == "activations", file=sys.stderr)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()  # so that its rate and elapsed time are the stage's own
            self.done.add(stage)

    def close(self) -> None:
        for stage, bar in self.bars.items():
            if stage not in self.done:
                bar.close()


def _many(args: argparse.Namespace) -> bool:
    return bool(args.layers or args.release or args.ids or args.ray)


def run(args: argparse.Namespace) -> int:
    if _many(args):
        from .scores_many import run_many

        return run_many(args)
    from ..config import ScoreParams
    from ..corpus import CorpusError, open_source
    from ..features import (
        DEFAULT_TOKENS,
        FeatureDataError,
        compute_many,
        matching_bundled,
    )
    from ..memory import HINT, OutOfMemory, is_out_of_memory
    from ..models import load_model
    from ..saes import load_sae
    from ..subsets import can_restrict, compute_subset

    try:
        check_args(args)
        features = parse_features(args.features) if args.features else None
        model_spec, sae_spec = specs_from_args(args, features or ())
        lm = load_model(model_spec)
        sae = load_sae(sae_spec, lm, model_name=model_spec.name)
        for f in features or []:
            sae.check_feature(f)
    except USER_ERRORS as exc:
        return fail(str(exc))

    params = build(ScoreParams, args, FLAGS)
    data = None
    if args.only == "all" and args.corpus == "bundled" and args.tokens is None and not args.no_cache:
        data = matching_bundled(lm, sae, params)  # shipped with the package: no corpus pass needed
        if data is not None and features:
            data = data.subset(features)
    sequences = None
    if args.only != "output" and data is None:
        from ..corpus import pack_sequences

        try:
            docs = open_source(args.corpus, split="train")
        except CorpusError as exc:
            return fail(str(exc))
        sequences = pack_sequences(lm.tokenizer, docs, args.context_size)
    if data is not None:
        print(f"using the feature data shipped for '{sae.id}' ({data.meta.get('n_tokens')} corpus tokens)", file=sys.stderr)
    else:
        bars = Bars()
        try:
            options = dict(n_tokens=args.tokens or DEFAULT_TOKENS, only=args.only, cache=not args.no_cache, progress=bars, corpus_name=args.corpus)
            if features and can_restrict(sae):  # a wide JumpReLU/ReLU SAE: only these latents in the corpus pass
                data = compute_subset(lm, sae, features, sequences, params, **options)
            else:
                data = compute_many(lm, [sae], sequences, params, features=features, **options)[0]
        except (CorpusError, FeatureDataError, OutOfMemory, ValueError) as exc:  # ValueError: e.g. a corpus with no tokens
            return fail(str(exc))
        except (RuntimeError, MemoryError) as exc:  # out of memory outside the batched output scores (the corpus pass)
            if not is_out_of_memory(exc):
                raise
            return fail(f"out of memory ({exc.__class__.__name__}): {HINT}")
        finally:
            bars.close()

    table = data.table
    if args.save:
        try:
            data.save(args.save)
        except OSError as exc:
            return write_failed("--save", args.save, exc, args.no_cache)
    if args.out:
        try:
            table.to_csv(args.out, index=False) if args.out.endswith(".csv") else table.to_parquet(args.out, index=False)
        except OSError as exc:
            return write_failed("--out", args.out, exc, args.no_cache)
        print(f"wrote {len(table)} features of SAE '{sae.id}' (layer {sae.layer}) to {args.out}")
        return 0
    sort_by = "input_score" if args.only == "input" else "output_score"
    shown = table if features else table.sort_values(sort_by, ascending=False, na_position="last").head(SHOWN)
    cols = ["feature", "output_score", "input_score", "density", "max_activation", "top_tokens"]
    print(shown[cols].to_string(index=False, max_colwidth=60, float_format=lambda v: f"{v:.4g}"))
    if len(shown) < len(table):
        print(f"({SHOWN} of {len(table)} features, highest {sort_by} first; --out FILE.csv writes all)")
    return 0
