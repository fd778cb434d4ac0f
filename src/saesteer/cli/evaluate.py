"""``python -m saesteer eval``: the paper's two experiments on one SAE layer.

- ``eval features --layer L [--n 100] [--seed S] [--prefixes N]``: the feature-level experiment
  (:mod:`saesteer.evaluation.feature_level`);
- ``eval [concepts] --layer L ...``: the concept-level evaluation (:mod:`saesteer.evaluation.concept_level`).
"""

from __future__ import annotations

import argparse
import math
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.allow_abbrev = False  # else the feature level's --n would read as an abbreviation of --n-concepts
    add_concept_arguments(p)
    sub = p.add_subparsers(dest="experiment", required=False, metavar="{concepts,features}")
    add_concept_arguments(sub.add_parser("concepts", help="concept level (the default)", description="concept-level evaluation"))
    add_feature_arguments(sub.add_parser("features", help="the paper's feature-level experiment", description="the paper's feature-level experiment"))


def add_feature_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation.feature_level import FeatureLevelParams

    d = FeatureLevelParams()
    add_model_args(p)
    add_sae_args(p)
    p.add_argument("--n", default=str(d.n_features), help=f"random features to steer (default {d.n_features})")
    p.add_argument("--feature-ids", default=None, help="comma-separated feature ids instead of a random sample")
    p.add_argument("--seed", default=str(d.seed), help="seeds the feature sample and the sampling of every generation")
    p.add_argument("--prefixes", default=str(d.n_prefixes), help=f"use the first N of the paper's 50 prefixes (default {d.n_prefixes})")
    p.add_argument("--amps", nargs="+", default=None, help=f"paper-mode amplifications (default: {' '.join(f'{s:g}' for s in d.amps)})")
    p.add_argument("--max-new-tokens", default=str(d.max_new_tokens), help=f"new tokens per generation (default {d.max_new_tokens})")
    p.add_argument("--temperature", default=str(d.temperature), help=f"sampling temperature (default {d.temperature})")
    p.add_argument("--select", default=d.select, choices=["combined", "success"], help="how the best amp is chosen (see the module docstring)")
    p.add_argument("--batch-size", default=str(d.batch_size), help="rows per decode call (memory and speed, not results)")
    p.add_argument("--features-per-unit", default=str(d.features_per_unit), help="features per saved unit (resumption, not results)")
    p.add_argument("--out", default=None, help="output directory (default: ~/.cache/saesteer/eval/<model>/<sae id>/features)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished features")
    p.add_argument("--features", default=None, help="feature-data directory (default: the bundled data of the SAE)")


def add_concept_arguments(p: argparse.ArgumentParser) -> None:
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
    try:
        out = int(value)
    except ValueError:
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None
    if out < low:
        raise ConfigError(f"{what} must be at least {low}, got {out}")
    return out


def _floats(values: list[str] | None, what: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if values is None:
        return default
    out = []
    for v in (x for item in values for x in item.split(",") if x.strip()):
        try:
            f = float(v)
        except ValueError:
            raise ConfigError(f"{what} must be numbers, got {v!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{what} must be finite numbers, got {v!r}")
        out.append(f)
    if not out:
        raise ConfigError(f"{what} needs at least one number")
    return tuple(out)


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

    data, source = feature_data(lm, sae, directory)
    return FeatureScores.from_table(data.table, data.lens, source)


def feature_data(lm, sae, directory: str | None):
    """(FeatureData, source) of ``sae``: from ``directory`` or the SAE's bundled feature data."""
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
    return data, source


def feature_params_from_args(args: argparse.Namespace):
    """The feature-level parameters, validated before the model loads."""
    from ..evaluation.feature_level import FeatureLevelParams

    ids = None
    if args.feature_ids:
        try:
            ids = tuple(int(x) for x in args.feature_ids.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--feature-ids must be comma-separated integers, got {args.feature_ids!r}") from None
    try:
        temperature = float(args.temperature)
    except ValueError:
        raise ConfigError(f"--temperature must be a number, got {args.temperature!r}") from None
    d = FeatureLevelParams()
    return FeatureLevelParams(
        n_features=_int(args.n, "--n"), seed=_int(args.seed, "--seed", 0), features=ids,
        amps=_floats(args.amps, "--amps", d.amps), n_prefixes=_int(args.prefixes, "--prefixes"),
        temperature=temperature, max_new_tokens=_int(args.max_new_tokens, "--max-new-tokens"), select=args.select,
        batch_size=_int(args.batch_size, "--batch-size"), features_per_unit=_int(args.features_per_unit, "--features-per-unit"),
    )


def run_features(args: argparse.Namespace) -> int:
    from .. import models, saes
    from ..evaluation import layout
    from ..evaluation.candidates import FeatureBank
    from ..evaluation.feature_level import FeatureLevelRun, feature_summary, headline, load_feature_run, write_feature_scores
    from ..features import FeatureDataError
    from ..saes import SaeLoadError

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        params = feature_params_from_args(args)
        sae_spec = sae_spec_from_args(args)
        model_spec = model_spec_from_args(args)
        precheck_sae(sae_spec, model_spec.name, params.features or ())
        lm = models.load_model(model_spec)
        sae = saes.load_sae(sae_spec, lm, model_name=model_spec.name)
        data, source = feature_data(lm, sae, args.features)
        bank = FeatureBank.from_feature_data(data, source)
        out = Path(args.out) if args.out else layout.default_out_dir(lm.name, sae.id) / layout.FEATURES_SUBDIR
        run = FeatureLevelRun(lm, sae, bank, out, params, resume=args.resume, log=log)
        write_feature_scores(out, bank, run.features)
        from tqdm import tqdm

        bar = tqdm(total=len(run.features), unit="feature", desc=f"features L{sae.layer}", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        try:
            run.run(progress)
        finally:
            bar.close()
        results = load_feature_run(out, bank)
    except (*USER_ERRORS, SaeLoadError, FeatureDataError) as exc:
        return fail(str(exc))
    summary = feature_summary(results.features)
    print(headline(summary))
    if "thresholds_output" in summary:
        print(summary["thresholds_output"].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"results: {out} (meta.json, units/, feature_scores.csv)")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "experiment", None) == "features":
        return run_features(args)
    return run_concepts(args)


def run_concepts(args: argparse.Namespace) -> int:
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
