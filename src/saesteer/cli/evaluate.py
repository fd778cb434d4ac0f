"""``python -m saesteer eval``: the paper's two experiments on one SAE layer.

- ``eval features --layer L [--n 100] [--seed S] [--prefixes N]``: the feature-level experiment
  (:mod:`saesteer.evaluation.feature_level`);
- ``eval [concepts] --layer L ...``: the concept-level evaluation (:mod:`saesteer.evaluation.concept_level`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import MAX_NEW_TOKENS_LIMIT, ConfigError
from ..evaluation.feature_level import FeatureLevelParams
from ..evaluation.params import EvalParams
from . import USER_ERRORS, add_model_and_sae_args, fail, specs_from_args
from .flags import Flag, add_flags, build, integer, number, numbers, parse_int, text, words


def feature_ids(raw, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(raw).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {raw!r}") from None


#: The EvalParams fields the concept level's command line sets (the Evaluation page's --resume command too).
FLAGS = (
    Flag("n_prefixes", integer(2)),
    Flag("strengths", numbers(), many=True),
    Flag("diffmean_coeffs", numbers(), many=True),
    Flag("methods", words(), many=True),
    Flag("max_new_tokens", integer(1, MAX_NEW_TOKENS_LIMIT)),
    Flag("seed", integer(0)),
    Flag("theta", number()),
    Flag("tau", number()),
    Flag("top_k", integer(1, 1000)),
    Flag("max_contexts", integer(1)),
    Flag("min_contexts", integer(1)),
    Flag("batch_size", integer(1)),
    Flag("concepts_per_batch", integer(1)),
)
#: The FeatureLevelParams fields ``eval features`` sets.
FEATURE_FLAGS = (
    Flag("n_features", integer(1), flag="--n"),
    Flag("features", feature_ids, flag="--feature-ids", note="(comma-separated; instead of a random sample)"),
    Flag("seed", integer(0)),
    Flag("n_prefixes", integer(1), flag="--prefixes"),
    Flag("amps", numbers(), many=True),
    Flag("max_new_tokens", integer(1)),
    Flag("temperature", number()),
    Flag("select", text(("combined", "success"))),
    Flag("batch_size", integer(1)),
    Flag("features_per_unit", integer(1)),
)
DEFAULT_N_CONCEPTS = 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.allow_abbrev = False  # else the feature level's --n would read as an abbreviation of --n-concepts
    add_concept_arguments(p)
    sub = p.add_subparsers(dest="experiment", required=False, metavar="{concepts,features}")
    add_concept_arguments(sub.add_parser("concepts", help="concept level (the default)", description="concept-level evaluation"))
    add_feature_arguments(sub.add_parser("features", help="the paper's feature-level experiment", description="the paper's feature-level experiment"))


def add_feature_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_sae_args(p)
    add_flags(p, FeatureLevelParams, FEATURE_FLAGS)
    p.add_argument("--out", default=None, help="output directory (default: ~/.cache/saesteer/eval/<model>/<sae id>/features)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished features")
    p.add_argument("--features", dest="features_dir", default=None, help="feature-data directory (default: the bundled data of the SAE)")


def add_concept_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_sae_args(p)
    p.add_argument("--concepts", default=None, help="file with one concept per line (default: assets/eval/concepts.txt)")
    p.add_argument("--n-concepts", default=str(DEFAULT_N_CONCEPTS), help="evaluate this many concepts that have candidate features (file order)")
    p.add_argument("--prefixes", default=None, help="file with one neutral prefix per line (default: assets/eval/prefixes.txt)")
    add_flags(p, EvalParams, FLAGS)
    p.add_argument("--out", default=None, help="output directory (default: ~/.cache/saesteer/eval/<model>/<sae id>)")
    p.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished (concept, method) units")
    p.add_argument("--features", dest="features_dir", default=None, help="feature-data directory (default: the bundled data of the SAE)")
    p.add_argument("--judge", action="store_true", help="also rate the reported generations with an LLM judge (see SAESTEER_JUDGE_* variables)")


def params_from_args(args: argparse.Namespace) -> EvalParams:
    """Everything that needs no model, validated before the model loads."""
    return build(EvalParams, args, FLAGS)


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


def feature_params_from_args(args: argparse.Namespace) -> FeatureLevelParams:
    """The feature-level parameters, validated before the model loads."""
    return build(FeatureLevelParams, args, FEATURE_FLAGS)


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
        model_spec, sae_spec = specs_from_args(args, params.features or ())
        lm = models.load_model(model_spec)
        sae = saes.load_sae(sae_spec, lm, model_name=model_spec.name)
        bank = FeatureBank.from_feature_data(*feature_data(lm, sae, args.features_dir))
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
    from ..evaluation.candidates import FeatureBank
    from ..features import FeatureDataError
    from ..saes import SaeLoadError

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        params = params_from_args(args)
        concepts = evaluate.read_list(args.concepts) if args.concepts else evaluate.default_concepts()
        prefixes = evaluate.read_list(args.prefixes) if args.prefixes else evaluate.default_prefixes()
        n_concepts = parse_int(args.n_concepts, "--n-concepts", 1)
        if not concepts:
            raise ConfigError("the concepts file lists no concepts")
        if len(prefixes) < params.n_prefixes:
            raise ConfigError(f"{len(prefixes)} prefixes given but --n-prefixes is {params.n_prefixes}: add prefixes or lower --n-prefixes")
        judge = None
        if args.judge:
            from ..judge import judge_from_env

            judge = judge_from_env()
        model_spec, sae_spec = specs_from_args(args)
        lm = models.load_model(model_spec)
        sae = saes.load_sae(sae_spec, lm, model_name=model_spec.name)
        bank = FeatureBank.from_feature_data(*feature_data(lm, sae, args.features_dir))
        out = Path(args.out) if args.out else evaluate.default_out_dir(lm.name, sae.id)
        results = evaluate.run_evaluation(lm, sae, bank, concepts, out, params, prefixes=prefixes, n_concepts=n_concepts,
                                          resume=args.resume, judge=judge, log=log)
    except (*USER_ERRORS, SaeLoadError, FeatureDataError) as exc:
        return fail(str(exc))
    table = results.methods(common=False)
    cols = [c for c in ("method", "n_concepts", "concept_score", "success_k", "fluency", "combined", "judge_score") if c in table.columns]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(evaluate.concept_headline(results))
    units = results.units
    if len(units):
        all_skipped = units.groupby("concept")["status"].apply(lambda s: (s == "skipped").all())
        skipped = [c for c, yes in all_skipped.items() if yes]
        if skipped:
            print(f"skipped (no candidate features): {', '.join(skipped)}")
    print(f"results: {out} (report.html, summary.csv, generations.parquet)")
    return 0
