"""``scores --layers … / --release R --ids PATTERN [--ray [ADDRESS]]``: many SAEs in one job, locally (one shared
activation pass) or on a Ray cluster (:mod:`saesteer.distributed`); each SAE's feature data is saved where the
app reads it (:func:`saesteer.paths.app_feature_dir`), so its pages show them without recomputing."""

from __future__ import annotations

import argparse
import sys

from . import USER_ERRORS, fail, model_spec_from_args
from .scores import write_failed


def parse_layers(text: str) -> list[int]:
    from .scores import parse_features

    try:
        return parse_features(text)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--features", "--layers").replace("feature id", "layer")) from None


def _refuse_single_flags(args: argparse.Namespace) -> None:
    from ..config import ConfigError

    if args.features:
        raise ConfigError("--features applies to one SAE (--layer/--sae); with --layers/--release every feature is scored")
    if args.layer is not None or args.sae:
        raise ConfigError("give either --layer/--sae (one SAE) or --layers/--release (many), not both")
    from .scores import RAY_FLAGS

    if args.no_cache and args.ray:
        raise ConfigError("--ray writes its results into the feature cache chunk by chunk (that is how it resumes): drop --no-cache")
    given = [f.name for f in RAY_FLAGS if getattr(args, f.field, None) is not None]
    if given and not args.ray:
        raise ConfigError(f"{', '.join(given)} need --ray")


def run_many(args: argparse.Namespace) -> int:
    from ..config import ScoreParams
    from ..corpus import CorpusError, open_source
    from ..features import DEFAULT_TOKENS, FeatureDataError, compute_many
    from ..paths import app_feature_dir
    from ..memory import HINT, OutOfMemory, is_out_of_memory
    from ..saes import precheck, select
    from ..store import Store, sae_fingerprint
    from .flags import build
    from .scores import FLAGS, RAY_FLAGS, Bars, check_args

    try:
        check_args(args)
        _refuse_single_flags(args)
        layers = parse_layers(args.layers) if args.layers else None
        model_spec = model_spec_from_args(args)
        specs = select(model_spec.name, layers, args.release, args.ids)
        for spec in specs:
            precheck(spec, model_spec.name)
    except USER_ERRORS as exc:
        return fail(str(exc))

    cluster = None
    if args.ray:
        from ..distributed import ClusterParams, RayUnavailable, connect

        try:  # connect first: a wrong address or a missing Ray fails before the model loads
            cluster = build(ClusterParams, args, RAY_FLAGS, address=None if args.ray == "local" else args.ray)
            connect(cluster)
        except (RayUnavailable, *USER_ERRORS) as exc:
            return fail(str(exc))

    from ..models import load_model
    from ..saes import load_sae

    try:
        lm = load_model(model_spec)
        saes = [load_sae(spec, lm, model_name=model_spec.name) for spec in specs]
    except USER_ERRORS as exc:
        return fail(str(exc))
    print(f"{len(saes)} SAE(s), {sum(s.width for s in saes):,} features: {', '.join(s.id for s in saes)}", file=sys.stderr)

    params = build(ScoreParams, args, FLAGS)
    sequences = None
    if args.only != "output":
        from ..corpus import pack_sequences

        try:
            docs = open_source(args.corpus, split="train")
        except CorpusError as exc:
            return fail(str(exc))
        sequences = pack_sequences(lm.tokenizer, docs, args.context_size)
    n_tokens = args.tokens or DEFAULT_TOKENS
    try:
        if cluster is not None:
            from ..distributed import JobFailed, SpecLoader, run_job, tqdm_progress

            progress, close = tqdm_progress()
            try:
                datas, report = run_job(lm, saes, specs, SpecLoader(model_spec), sequences, params, n_tokens, args.only,
                                        Store(), args.corpus, cluster, progress)
            except JobFailed as exc:
                return fail(str(exc))
            finally:
                close()
            print(f"ray: {report.submitted} task(s) run on {len(report.pids)} worker process(es), {report.cached} already cached",
                  file=sys.stderr)
        else:
            bars = Bars()
            try:
                datas = compute_many(lm, saes, sequences, params, n_tokens, only=args.only, cache=not args.no_cache,
                                     progress=bars, corpus_name=args.corpus)
            finally:
                bars.close()
    except (CorpusError, FeatureDataError, OutOfMemory, ValueError) as exc:
        return fail(str(exc))
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        return fail(f"out of memory ({exc.__class__.__name__}): {HINT}")

    import pandas as pd

    rows, tables = [], []
    for sae, data in zip(saes, datas):
        where = None
        if not args.no_cache:
            try:
                where = data.save(app_feature_dir(lm.name, sae.id, sae_fingerprint(sae)))
            except OSError as exc:
                print(f"warning: could not save '{sae.id}' for the app ({exc})", file=sys.stderr)
        t = data.table
        rows.append({"sae": sae.id, "layer": sae.layer, "features": len(t), "median_output": t["output_score"].median(),
                     "with_input": int(t["input_score"].notna().sum()), "median_input": t["input_score"].median(), "saved": str(where or "-")})
        tables.append(t.assign(sae=sae.id, layer=sae.layer))
    if args.save:
        from pathlib import Path

        for sae, data in zip(saes, datas):
            target = Path(args.save) / sae.id.replace("/", "__")
            try:
                data.save(target)
            except OSError as exc:
                return write_failed("--save", target, exc, args.no_cache)
    if args.out:
        table = pd.concat(tables, ignore_index=True)
        table = table[["sae", "layer", *[c for c in table.columns if c not in ("sae", "layer")]]]
        try:
            table.to_csv(args.out, index=False) if args.out.endswith(".csv") else table.to_parquet(args.out, index=False)
        except OSError as exc:
            return write_failed("--out", args.out, exc, args.no_cache)
        print(f"wrote {len(table)} features of {len(saes)} SAE(s) to {args.out}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
