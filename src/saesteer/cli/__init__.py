"""CLI subcommands; shared argument helpers and the error boundary live here."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, ModelSpec
from .flags import Flag, add_flags, build, text

#: The ModelSpec fields every subcommand that loads a model takes.
MODEL_FLAGS = (
    Flag("name", text(), flag="--model"),
    Flag("device", text()),
    Flag("dtype", text(("float32", "bfloat16", "float16"))),
    Flag("trust_remote_code", None),
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, ModelSpec, MODEL_FLAGS)


def add_sae_args(p: argparse.ArgumentParser, layer_required: bool = False) -> None:
    p.add_argument("--layer", type=int, required=layer_required, help="layer of a bundled SAE")
    p.add_argument("--sae", default=None, help="bundled SAE id, a local sae-lens directory, or RELEASE:SAE_ID for a sae-lens release")


def fail(message: str) -> int:
    """Print a one-line error (no traceback) and return the exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ValueError, FileNotFoundError, RuntimeError)


def sae_spec_from_args(args: argparse.Namespace):
    """--sae / --layer -> SaeSpec: RELEASE:ID (sae-lens release), an existing directory (local), else a bundled id."""
    from pathlib import Path

    from ..config import SaeSpec

    sae = getattr(args, "sae", None)
    if sae and ":" in sae and not Path(sae).exists():
        release, sae_id = sae.split(":", 1)
        return SaeSpec(source="release", release=release, sae_id=sae_id)
    if sae and Path(sae).expanduser().is_dir():
        return SaeSpec(source="local", path=sae)
    if sae:
        return SaeSpec(source="bundled", sae_id=sae, layer=args.layer)
    if args.layer is None:
        raise ConfigError("give --layer L (a bundled SAE) or --sae (bundled id, directory, or RELEASE:SAE_ID)")
    return SaeSpec(source="bundled", layer=args.layer)


def precheck_sae(sae_spec, model_name: str, features=()) -> None:
    """Fail on a wrong SAE (no bundled SAE at the layer, no cfg.json, unknown release or id) and on feature ids
    beyond its width where that is known, before the model loads (the embedded one takes seconds to minutes)."""
    from ..saes import check_feature_id, precheck

    sae_id, width = precheck(sae_spec, model_name)
    if width is not None:
        for f in features:
            check_feature_id(int(f), int(width), sae_id)


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    return build(ModelSpec, args, MODEL_FLAGS)


def add_model_and_sae_args(p: argparse.ArgumentParser) -> None:
    """The flags of a subcommand that loads a model and one SAE."""
    add_model_args(p)
    add_sae_args(p)


def specs_from_args(args: argparse.Namespace, features=()):
    """The (ModelSpec, SaeSpec) the flags name, the SAE prechecked with ``features`` (:func:`precheck_sae`), so
    that a wrong SAE or feature id fails before the model loads."""
    sae_spec = sae_spec_from_args(args)
    model_spec = model_spec_from_args(args)
    precheck_sae(sae_spec, model_spec.name, features)
    return model_spec, sae_spec
