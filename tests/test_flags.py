"""CLI flags made from the parameter dataclasses (``saesteer.cli.flags``): help and defaults come from the
dataclass, parsed flags build it, and a command line printed from it parses back to the same value."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from saesteer.__main__ import build_parser
from saesteer.cli import MODEL_FLAGS
from saesteer.cli import scores as scores_cli
from saesteer.cli import steer as steer_cli
from saesteer.cli.flags import (
    Flag,
    add_flags,
    build,
    command_line,
    field_docs,
    integer,
    number,
    numbers,
    parse_float,
    parse_floats,
    parse_int,
    parse_ints,
    show,
    text,
    words,
)
from saesteer.config import ConfigError, ModelSpec, ScoreParams, SteerParams, TrainParams


@dataclasses.dataclass(frozen=True)
class Toy:
    """A dataclass of every kind of field a flag can set."""

    count: int = 3
    """How many."""
    scale: float = 0.25
    """A scale, in units
    of something."""
    grid: tuple[float, ...] = (0.5, 2.0)
    """Values swept."""
    names: tuple[str, ...] = ("a", "b")
    """Which ones."""
    mode: str = "fast"
    """fast or slow."""
    loud: bool = False
    """Say more."""

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"count must be >= 0, got {self.count}")


TOY_FLAGS = (
    Flag("count", integer()),
    Flag("scale", number()),
    Flag("grid", numbers(), many=True),
    Flag("names", words(("a", "b", "c")), many=True),
    Flag("mode", text(("fast", "slow"))),
    Flag("loud", None),
)


def toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, Toy, TOY_FLAGS)
    return p


def test_field_docs_are_read_from_the_class_source_as_one_line():
    docs = field_docs(Toy)
    assert docs["count"] == "How many."
    assert docs["scale"] == "A scale, in units of something."
    assert field_docs(SteerParams)["max_new_tokens"] == "Tokens to generate, 1..1024."


def test_help_and_defaults_come_from_the_dataclass():
    p = toy_parser()
    helps = {a.dest: a.help for a in p._actions}
    assert helps["count"] == "How many. (default: 3)"
    assert helps["grid"] == "Values swept. (default: 0.5 2)"
    assert helps["loud"] == "Say more."
    assert build(Toy, p.parse_args([]), TOY_FLAGS) == Toy()  # nothing given: every dataclass default


def test_parsed_flags_build_the_dataclass():
    args = toy_parser().parse_args(["--count", "7", "--scale", "1e-3", "--grid", "1,2", "4", "--names", "c", "--mode", "slow", "--loud"])
    assert build(Toy, args, TOY_FLAGS) == Toy(count=7, scale=1e-3, grid=(1.0, 2.0, 4.0), names=("c",), mode="slow", loud=True)


@pytest.mark.parametrize("params", [
    Toy(),
    Toy(count=0, scale=1 / 3, grid=(0.1, 1e-12, 20.0), names=("b", "a"), mode="slow", loud=True),
    Toy(scale=123456.789),
])
def test_a_printed_command_line_parses_back_to_the_same_params(params):
    argv = command_line(params, TOY_FLAGS)
    assert build(Toy, toy_parser().parse_args(argv), TOY_FLAGS) == params
    if params == Toy():
        assert argv == []  # defaults are left out
    full = command_line(params, TOY_FLAGS, all_values=True)
    assert build(Toy, toy_parser().parse_args(full), TOY_FLAGS) == params


def test_steer_params_round_trip_through_the_steer_parser():
    params = SteerParams(features=(3,), strengths=(2.5,), mode="additive", max_new_tokens=7, temperature=0.7, seed=11)
    argv = ["steer", "--feature", "3", "--strength", "2.5", "--prompt", "x", *command_line(params, steer_cli.FLAGS)]
    assert steer_cli.params_from_args(build_parser().parse_args(argv)) == params


def test_every_cli_default_is_the_dataclass_default():
    """No subcommand writes a default of its own for a dataclass field: not given, each flag is None in the
    parsed arguments and the built dataclass has the field's default."""
    parser = build_parser()
    steer = parser.parse_args(["steer", "--feature", "1", "--strength", "1", "--prompt", "x"])
    assert all(getattr(steer, f.field) is None for f in (*steer_cli.FLAGS, *MODEL_FLAGS))
    assert steer_cli.params_from_args(steer) == SteerParams(features=(1,), strengths=(1.0,))
    scores = parser.parse_args(["scores", "--layer", "2"])
    assert build(ScoreParams, scores, scores_cli.FLAGS) == ScoreParams()
    assert build(ModelSpec, scores, MODEL_FLAGS) == ModelSpec()
    bundle = parser.parse_args(["build-bundle"])
    from saesteer.cli import build_bundle

    assert build(TrainParams, bundle, build_bundle.FLAGS) == TrainParams()


@pytest.mark.parametrize("call, message", [
    (lambda: parse_int("x", "--n"), "--n must be an integer, got 'x'"),
    (lambda: parse_int("2.5", "--n"), "--n must be an integer, got '2.5'"),
    (lambda: parse_int("1", "--n", low=2), "--n must be at least 2, got 1"),
    (lambda: parse_int("9", "--n", high=8), "--n must be at most 8, got 9"),
    (lambda: parse_float("x", "--a"), "--a must be a number, got 'x'"),
    (lambda: parse_float("nan", "--a"), "--a must be a finite number, got 'nan'"),
    (lambda: parse_float("0", "--a", positive=True), "--a must be a positive number, got '0'"),
    (lambda: parse_floats(["1", "y"], "--grid"), "--grid must be numbers, got 'y'"),
    (lambda: parse_floats(["inf"], "--grid"), "--grid must be finite numbers, got 'inf'"),
    (lambda: parse_floats([","], "--grid"), "--grid needs at least one number"),
    (lambda: parse_ints("2,x", "--layers"), "--layers must be an integer, got 'x'"),
    (lambda: words(("a", "b"))(["a", "z"], "--names"), "--names: unknown z; use some of a, b"),
    (lambda: text(("fast", "slow"))("medium", "--mode"), "--mode 'medium' is unknown: use 'fast' or 'slow'"),
])
def test_shared_parsers_name_the_flag_and_what_is_allowed(call, message):
    with pytest.raises(ConfigError) as err:
        call()
    assert str(err.value) == message


def test_show_writes_floats_exactly():
    assert show(0.5) == "0.5" and show(4e-4) == "0.0004" and show(2.0) == "2"
    assert float(show(1 / 3)) == 1 / 3
    assert show((0.2, 20.0)) == "0.2 20"


def test_a_switch_needs_a_false_default_and_a_field_must_exist():
    @dataclasses.dataclass(frozen=True)
    class On:
        on: bool = True
        """Already on."""

    with pytest.raises(ValueError, match="a switch needs a field whose default is False"):
        add_flags(argparse.ArgumentParser(), On, [Flag("on", None)])
    with pytest.raises(KeyError, match="no field 'nope'"):
        add_flags(argparse.ArgumentParser(), Toy, [Flag("nope", integer())])
