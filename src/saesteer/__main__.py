"""``python -m saesteer``: a thin shell over the library. Each subcommand lives in ``saesteer/cli/<name>.py``
and defines ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("info", "describe the model and the available SAEs"),
    "steer": ("steer", "generate baseline and steered continuations"),
    "scores": ("scores", "compute input/output scores and activation statistics"),
    "build-corpus": ("build_corpus", "rebuild the bundled offline corpus from Debian packages"),
    "build-bundle": ("build_bundle", "train the bundled SAEs with sae-lens and measure their quality"),
    "eval": ("evaluate", "evaluate steering: the paper's feature-level and concept-level experiments"),
    "presets": ("presets", "find an SAE's demo presets by calibration, for the duel and the lab"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m saesteer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"saesteer.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"saesteer.cli.{module}":
                raise
            continue  # subcommand not implemented in this build
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
