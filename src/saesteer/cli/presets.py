"""``python -m saesteer presets``: find the demo presets of an SAE by calibration (:func:`saesteer.presets.search`)
and write them where the app reads them; resumable (an interrupted search goes on where it stopped)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import USER_ERRORS, add_model_args, add_sae_args, fail, specs_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_sae_args(p)
    p.add_argument("--layers", default=None, help="comma-separated bundled layers, searched one after the other (e.g. 2,5,8)")
    p.add_argument("--features", dest="features_dir", default=None,
                   help="the SAE's feature data directory (from `scores --out`); default: its bundled feature data")
    p.add_argument("--tries", type=int, default=None, help="candidates calibrated at most per SAE (default 120)")
    p.add_argument("--pool", type=int, default=None,
                   help="features of the highest output score whose top words join the concept list as candidates (default: all; 0: the list only)")
    p.add_argument("--out", default=None, help="root folder to write to (default: assets/presets for a bundled SAE, else the cache)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming or keeping a finished search")


def _layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {text!r}") from None
    if not layers:
        raise ValueError("--layers names no layer: give e.g. --layers 2,8")
    return layers


def run(args: argparse.Namespace) -> int:
    from .. import models, presets, saes
    from ..evaluation.candidates import FeatureBank
    from ..features import FeatureDataError
    from ..paths import BUNDLED_PRESETS, presets_cache, presets_file
    from ..saes import SaeLoadError
    from .evaluate import feature_data

    try:
        tries = presets.SEARCH_TRIES if args.tries is None else int(args.tries)
        if tries < 1:
            raise ValueError(f"--tries must be at least 1, got {tries}")
        pool = presets.SEARCH_POOL if args.pool is None else int(args.pool)
        if pool is not None and pool < 0:
            raise ValueError(f"--pool must be 0 (the concept list only) or a number of features, got {pool}")
        if args.layers is not None and (args.layer is not None or args.sae):
            raise ValueError("give --layers, or one of --layer / --sae, not both")
        jobs = []
        for layer in _layers(args.layers) if args.layers is not None else [args.layer]:
            args.layer = layer
            jobs.append(specs_from_args(args))
        lm = models.load_model(jobs[0][0])
        for _, sae_spec in jobs:
            sae = saes.load_sae(sae_spec, lm)
            bank = FeatureBank.from_feature_data(*feature_data(lm, sae, args.features_dir))
            root = Path(args.out) if args.out else BUNDLED_PRESETS if sae_spec.source == "bundled" else presets_cache()
            path = presets_file(root, lm.name, sae.id)
            earlier = None if args.fresh else presets.read_search(path)
            if earlier is not None and earlier.key == presets.search_key(lm, sae) and not earlier.goes_on(tries, presets.search_pool(pool, len(bank.output_score))):
                print(f"{sae.id}: up to date in {path} ({earlier.summary()}); --fresh searches again", file=sys.stderr)
                continue
            result = _search(lm, sae, bank, tries, pool, earlier, root)
            print(f"{sae.id}: {result.summary()} in {result.elapsed_s:.0f} s -> {path}", file=sys.stderr)
            for p in result.presets:
                print(f"  {p.concept}: feature {p.feature}, amp {p.strength:g}", file=sys.stderr)
    except (*USER_ERRORS, SaeLoadError, FeatureDataError) as exc:
        return fail(str(exc))
    return 0


def _search(lm, sae, bank, tries: int, pool: int | None, resume, root: Path):
    from tqdm import tqdm

    from .. import presets

    bar = tqdm(total=tries, unit="candidate", desc=f"presets {sae.id}", file=sys.stderr)
    if resume is not None:
        bar.update(len(resume.tried))

    def progress(i: int, total: int, tried) -> None:
        bar.total = total
        bar.n = i
        bar.set_postfix_str(f"{tried.concept}: {'ok at amp ' + format(tried.strength, 'g') if tried.ok else 'no'}")
        bar.refresh()

    try:
        result = presets.search(lm, sae, bank, tries=tries, pool=pool, resume=resume, progress=progress,
                                checkpoint=lambda s: presets.write_search(s, root))
    finally:
        bar.close()
    presets.write_search(result, root)
    return result
