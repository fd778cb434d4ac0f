"""``python -m saesteer info``: the model's shape and the SAEs bundled for it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import USER_ERRORS, add_model_args, add_sae_args, fail, model_spec_from_args, precheck_sae, sae_spec_from_args

SAE_KEYS = ("id", "layer", "width", "hook", "path")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_sae_args(p)
    p.add_argument("--diagnose-tokens", type=int, default=8192,
                   help="with --sae/--layer: held-out tokens on which that SAE's dense latents are measured (default 8192)")


def bundled_saes(model_name: str) -> list[dict]:
    """SAEs shipped under assets/ for ``model_name``; none for a local directory or an unbundled hub id."""
    from .. import paths, saes

    if Path(model_name).expanduser().exists():
        return []
    root = paths.bundled_sae_dir(model_name).resolve()
    if not root.is_relative_to(paths.BUNDLED_SAES.resolve()):
        return []  # a name such as '../x' must not read a manifest outside assets/
    return [{**{k: e.get(k) for k in SAE_KEYS}, "diagnostics": e.get("diagnostics")} for e in saes.list_bundled(model_name)]


def collect(args: argparse.Namespace) -> dict:
    from .. import models

    model_spec = model_spec_from_args(args)
    spec = sae_spec_from_args(args) if (args.sae or args.layer is not None) else None
    if spec is not None:
        precheck_sae(spec, model_spec.name)
    lm = models.load_model(model_spec)
    d = lm.describe()
    info = {"model": {k: d[k] for k in ("name", "n_layers", "d_model", "vocab_size", "device")}, "saes": bundled_saes(model_spec.name)}
    if spec is not None:
        from ..diagnostics import measure
        from ..saes import load_sae

        sae = load_sae(spec, lm)
        info["diagnosed"] = {"id": sae.id, "layer": sae.layer, "hook": sae.hook_name,
                             "diagnostics": measure(lm, sae, args.diagnose_tokens).to_dict()}
    return info


def format_table(info: dict) -> str:
    m = info["model"]
    lines = [
        f"model  {m['name']}",
        f"       {m['n_layers']} layers, d_model {m['d_model']}, vocab {m['vocab_size']}, device {m['device']}",
        "",
    ]
    if not info["saes"]:
        lines.append("SAEs   none bundled for this model (use --sae DIR or --sae RELEASE:SAE_ID)")
        return "\n".join(lines)
    rows = [("id", "layer", "width", "hook", "path")] + [tuple(str(s[k]) for k in SAE_KEYS) for s in info["saes"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(SAE_KEYS))]
    lines.append("SAEs")
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += _diagnostic_lines([(s["id"], s.get("diagnostics")) for s in info["saes"]] +
                               ([(info["diagnosed"]["id"], info["diagnosed"]["diagnostics"])] if "diagnosed" in info else []))
    return "\n".join(lines)


def _diagnostic_lines(items: list[tuple[str, dict | None]]) -> list[str]:
    from ..diagnostics import from_dict

    known = [(sae_id, from_dict(d)) for sae_id, d in items if d]
    if not known:
        return []
    return ["", "Peak latent (the unit of paper-mode strength), on held-out text"] + [f"  {sae_id}: {d.summary()}" for sae_id, d in known]


def run(args: argparse.Namespace) -> int:
    try:
        info = collect(args)
    except USER_ERRORS as exc:
        return fail(str(exc))
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
