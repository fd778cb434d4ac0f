"""``python -m saesteer steer``: baseline and steered continuations of one prompt."""

from __future__ import annotations

import argparse
import json

from ..config import ConfigError, SteerParams
from . import USER_ERRORS, add_model_and_sae_args, fail, specs_from_args
from .flags import Flag, add_flags, build, integer, number, parse_float, parse_int, text


#: The SteerParams fields the command line sets (features and strengths come in pairs, below).
FLAGS = (
    Flag("mode", text()),
    Flag("max_new_tokens", integer()),
    Flag("seed", integer()),
    Flag("temperature", number()),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_sae_args(p)
    # Parsed as strings so that bad values get saesteer's one-line error instead of argparse's usage dump.
    p.add_argument("--feature", action="append", default=[], help="feature id (repeat for several features)")
    p.add_argument("--strength", action="append", default=[], help="strength per --feature: amp (paper) or coefficient (additive)")
    p.add_argument("--prompt", required=True, help="text to continue")
    add_flags(p, SteerParams, FLAGS)
    p.add_argument("--fast-decode", action="store_true", help="decode both runs with a reduced-precision bf16 copy of the whole model (about 2x faster on CPU, about 0.54 GB more memory for Gemma 3 270M)")
    p.add_argument("--json", action="store_true", help='print {"baseline": ..., "steered": ...}')


def params_from_args(args: argparse.Namespace) -> SteerParams:
    """Validate everything that needs no model, so bad input fails before the model loads."""
    if not args.feature:
        raise ConfigError("give at least one --feature F with a matching --strength S")
    if not args.prompt.strip():
        raise ConfigError("the prompt is empty: give some text with --prompt")
    features = tuple(parse_int(f, "--feature") for f in args.feature)
    strengths = tuple(parse_float(s, "--strength") for s in args.strength)
    return build(SteerParams, args, FLAGS, features=features, strengths=strengths)


def check_context(lm, params: SteerParams) -> None:
    """Refuse ``--max-new-tokens`` that the model's positions cannot hold, naming the flag (the prompt limit
    itself, context − new tokens, is applied by ``steering.encode_prompts``)."""
    context = lm.context_length
    if context is not None and params.max_new_tokens >= context:
        raise ConfigError(f"--max-new-tokens {params.max_new_tokens} does not fit model '{lm.name}', whose context is {context} tokens: use fewer")


def _strength_meaning(lm, sae, prompt: str, params: SteerParams) -> list[str]:
    """In paper mode, what each amp adds at the prompt's last position, in plain words (densities from the
    bundled feature data when it matches this SAE)."""
    if params.mode != "paper":
        return []
    from ..diagnostics import densities, explain_amps, prompt_strength
    from ..features import matching_bundled

    data = matching_bundled(lm, sae)
    dens = densities(data.table["feature"].to_numpy(), data.table["density"].to_numpy(), sae.width) if data is not None else None
    return explain_amps(prompt_strength(lm, sae, prompt, dens), sae, list(params.features), list(params.strengths))


def run(args: argparse.Namespace) -> int:
    from .. import models, saes, steering

    try:
        params = params_from_args(args)
        model_spec, sae_spec = specs_from_args(args, params.features)
        lm = models.load_model(model_spec)
        sae = saes.load_sae(sae_spec, lm, model_name=model_spec.name)
        for f in params.features:
            sae.check_feature(f)
        check_context(lm, params)
        baseline, steered = steering.generate_pair(lm, sae, args.prompt, params, fast=args.fast_decode)
        meaning = _strength_meaning(lm, sae, args.prompt, params)
    except USER_ERRORS as exc:
        return fail(str(exc))
    if args.json:
        out = {"baseline": baseline, "steered": steered}
        if meaning:
            out["strength_meaning"] = meaning
        print(json.dumps(out, ensure_ascii=False))
        return 0
    terms = ", ".join(f"{f}×{s:g}" for f, s in zip(params.features, params.strengths))
    print(f"model {lm.name} · SAE {sae.id} (layer {sae.layer}) · {params.mode} mode · {terms}")
    for f, line in zip(params.features, meaning):
        print(f"strength: feature {f}: {line}")
    print(f"prompt:   {args.prompt}")
    print(f"baseline: {baseline}")
    print(f"steered:  {steered}")
    return 0
