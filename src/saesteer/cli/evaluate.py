"""``python -m saesteer eval``: steering evaluation of one SAE layer (output- vs input-score feature selection
vs random features vs DiffMean, LoRA, prompting and no steering). See ``saesteer.evaluate`` for the protocol."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import MAX_NEW_TOKENS_LIMIT, PAPER_STRENGTHS, ConfigError
from . import (
    USER_ERRORS,
    add_model_args,
    add_sae_args,
    fail,
    model_spec_from_args,
    precheck_sae,
    sae_spec_from_args,
)
from .flags import parse_floats, parse_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation import DIFFMEAN_COEFFS, METHODS

    add_model_args(p)
    add_sae_args(p)
    # Numbers are parsed as strings so that bad values get saesteer's one-line error, not argparse's usage dump.
    p.add_argument("--concepts", default=None, help="file with one concept per line (default: assets/eval/concepts.txt)")
    p.add_argument("--n-concepts", default="30", help="evaluate this many concepts that have candidate features (file order)")
    p.add_argument("--prefixes", default=None, help="file with one neutral prefix per line (default: assets/eval/prefixes.txt)")
    p.add_argument("--n-prefixes", default="20", help="use the first N prefixes (half choose the strength, half are reported)")
    p.add_argument("--out", default=None, help="output directory (default: ~/.cache/saesteer/eval/<model>/<sae id>)")
    p.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished (concept, method) units")
    p.add_argument("--strengths", nargs="+", default=None, help=f"paper-mode amplifications (default: {' '.join(f'{s:g}' for s in PAPER_STRENGTHS)})")
    p.add_argument("--diffmean-coeffs", nargs="+", default=None, help=f"DiffMean coefficients × residual norm (default: {' '.join(f'{s:g}' for s in DIFFMEAN_COEFFS)})")
    p.add_argument("--methods", nargs="+", default=None, help=f"methods to run (default: all of {' '.join(METHODS)})")
    p.add_argument("--max-new-tokens", default="24", help=f"tokens generated per prefix, 1..{MAX_NEW_TOKENS_LIMIT}")
    p.add_argument("--seed", default="0", help="seed of the prefix split, random features and LoRA")
    p.add_argument("--batch-size", default="512", help="rows per batched generate call (memory and speed, not results)")
    p.add_argument("--concepts-per-batch", default="3", help="concepts whose rows share each decode call (speed, not results)")
    p.add_argument("--features", default=None, help="feature-data directory (default: the bundled data of the SAE)")
    p.add_argument("--judge", action="store_true", help="also rate the reported generations with an LLM judge (see SAESTEER_JUDGE_* variables)")


def _int(value: str, what: str, low: int = 1) -> int:
    return parse_int(value, what, low)


def _floats(values: list[str] | None, what: str, default: tuple[float, ...]) -> tuple[float, ...]:
    return default if values is None else parse_floats(values, what)


def params_from_args(args: argparse.Namespace):
    """Everything that needs no model, validated before the model loads."""
    from ..evaluation import DIFFMEAN_COEFFS, METHODS, EvalParams

    methods = tuple(args.methods) if args.methods else METHODS
    return EvalParams(
        strengths=_floats(args.strengths, "--strengths", PAPER_STRENGTHS),
        diffmean_coeffs=_floats(args.diffmean_coeffs, "--diffmean-coeffs", DIFFMEAN_COEFFS),
        methods=methods,
        n_prefixes=_int(args.n_prefixes, "--n-prefixes", 2),
        max_new_tokens=_int(args.max_new_tokens, "--max-new-tokens"),
        seed=_int(args.seed, "--seed", 0),
        batch_size=_int(args.batch_size, "--batch-size"),
        concepts_per_batch=_int(args.concepts_per_batch, "--concepts-per-batch"),
    )


def feature_scores(lm, sae, directory: str | None):
    """Input/output scores and logit lens of ``sae``: from ``directory`` or the SAE's bundled feature data."""
    from ..evaluation import FeatureScores
    from ..features import FeatureData, load_bundled

    if directory:
        data = FeatureData.load(directory)
        source = str(directory)
    else:
        data = load_bundled(sae.id, lm.name)
        source = f"bundled:{sae.id}"
        if data is None:
            raise ConfigError(
                f"SAE '{sae.id}' has no precomputed feature data (input scores need a corpus pass): compute it with "
                "`python -m saesteer scores` and pass its directory with --features"
            )
    if data.meta.get("sae_id") not in (None, sae.id):
        raise ConfigError(f"the feature data in {source} belongs to SAE '{data.meta.get('sae_id')}', not '{sae.id}'")
    return FeatureScores.from_table(data.table, data.lens, source)


def run(args: argparse.Namespace) -> int:
    from .. import evaluation as evaluate, models, saes
    from ..features import FeatureDataError
    from ..saes import SaeLoadError

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        params = params_from_args(args)
        concepts = evaluate.read_list(args.concepts) if args.concepts else evaluate.default_concepts()
        prefixes = evaluate.read_list(args.prefixes) if args.prefixes else evaluate.default_prefixes()
        n_concepts = _int(args.n_concepts, "--n-concepts")
        if not concepts:
            raise ConfigError("the concepts file lists no concepts")
        if len(prefixes) < params.n_prefixes:
            raise ConfigError(f"{len(prefixes)} prefixes given but --n-prefixes is {params.n_prefixes}: add prefixes or lower --n-prefixes")
        judge = None
        if args.judge:
            from ..judge import judge_from_env

            judge = judge_from_env()
        sae_spec = sae_spec_from_args(args)
        model_spec = model_spec_from_args(args)
        precheck_sae(sae_spec, model_spec.name)
        lm = models.load_model(model_spec)
        sae = saes.load_sae(sae_spec, lm, model_name=model_spec.name)
        scores = feature_scores(lm, sae, args.features)
        out = Path(args.out) if args.out else evaluate.default_out_dir(lm.name, sae.id)
        results = evaluate.run_evaluation(lm, sae, scores, concepts, out, params, prefixes=prefixes, n_concepts=n_concepts,
                                          resume=args.resume, judge=judge, log=log)
    except (*USER_ERRORS, SaeLoadError, FeatureDataError) as exc:
        return fail(str(exc))
    table = results.methods()
    cols = [c for c in ("method", "n_concepts", "concept_score", "success_k", "fluency", "combined", "judge_score") if c in table.columns]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    units = results.units
    if len(units):
        all_skipped = units.groupby("concept")["status"].apply(lambda s: (s == "skipped").all())
        skipped = [c for c, yes in all_skipped.items() if yes]
        if skipped:
            print(f"skipped (no candidate features): {', '.join(skipped)}")
    print(f"results: {out} (report.html, summary.csv, generations.parquet)")
    return 0
