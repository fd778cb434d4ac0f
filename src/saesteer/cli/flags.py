"""Command-line flags made from the parameter dataclasses, and the number parsers every subcommand shares.

A subcommand lists one :class:`Flag` per dataclass field it exposes. That entry is the only place where the
flag's name and parser are written; its help is the field's docstring and its default the field's default,
both read from the dataclass. The same entries build the argument parser (:func:`add_flags`), turn parsed
arguments into the dataclass (:func:`build`), and turn a dataclass back into a command line
(:func:`command_line`, e.g. the Evaluation page's ``--resume`` command).

Values are parsed as strings by saesteer, not by argparse, so that a bad value gets a one-line error naming
the flag and what is allowed instead of argparse's usage dump.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from ..config import ConfigError

Parser = Callable[[object, str], object]
"""``parse(raw, flag)``: the value of ``flag`` from its raw text (a list of texts for ``nargs='+'``)."""


# ---------------------------------------------------------------------------------------------------
# Shared parsers: each names the flag and what is allowed when it refuses a value


def parse_int(value: str, what: str, low: int | None = None, high: int | None = None) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None
    if low is not None and out < low:
        raise ConfigError(f"{what} must be at least {low}, got {out}")
    if high is not None and out > high:
        raise ConfigError(f"{what} must be at most {high}, got {out}")
    return out


def parse_float(value: str, what: str, positive: bool = False) -> float:
    try:
        out = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if positive and out <= 0:
        raise ConfigError(f"{what} must be a positive number, got {value!r}")
    return out


def parse_floats(values: str | Sequence[str], what: str) -> tuple[float, ...]:
    """Numbers given as separate words and/or comma-separated: ``1 2,3`` -> (1.0, 2.0, 3.0)."""
    items = [values] if isinstance(values, str) else list(values)
    out = []
    for v in (x.strip() for item in items for x in str(item).split(",") if x.strip()):
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


def parse_ints(values: str | Sequence[str], what: str, low: int | None = None) -> tuple[int, ...]:
    """Integers given as separate words and/or comma-separated: ``2,5 8`` -> (2, 5, 8)."""
    items = [values] if isinstance(values, str) else list(values)
    out = tuple(parse_int(x, what, low) for item in items for x in str(item).split(",") if x.strip())
    if not out:
        raise ConfigError(f"{what} needs at least one integer")
    return out


def integer(low: int | None = None, high: int | None = None) -> Parser:
    return lambda raw, what: parse_int(raw, what, low, high)


def number(positive: bool = False) -> Parser:
    return lambda raw, what: parse_float(raw, what, positive)


def numbers() -> Parser:
    return parse_floats


def integers(low: int | None = None) -> Parser:
    return lambda raw, what: parse_ints(raw, what, low)


def words(choices: Sequence[str] | None = None) -> Parser:
    """Names given as separate words and/or comma-separated, each one of ``choices`` when given."""

    def parse(raw, what: str) -> tuple[str, ...]:
        items = [raw] if isinstance(raw, str) else list(raw)
        out = tuple(x.strip() for item in items for x in str(item).split(",") if x.strip())
        if not out:
            raise ConfigError(f"{what} needs at least one name")
        unknown = [x for x in out if choices is not None and x not in choices]
        if unknown:
            raise ConfigError(f"{what}: unknown {', '.join(unknown)}; use some of {', '.join(choices)}")
        return out

    return parse


def text(choices: Sequence[str] | None = None) -> Parser:
    def parse(raw, what: str) -> str:
        value = str(raw)
        if choices is not None and value not in choices:
            raise ConfigError(f"{what} {value!r} is unknown: use {' or '.join(repr(c) for c in choices)}")
        return value

    return parse


# ---------------------------------------------------------------------------------------------------
# Flags from dataclass fields


@dataclass(frozen=True)
class Flag:
    """One dataclass field on the command line."""

    field: str
    """The dataclass field."""
    parse: Parser | None
    """Turns the flag's raw text into the field's value (the dataclass then validates it); None for a switch
    (a boolean field whose default is False: the flag alone turns it on)."""
    flag: str | None = None
    """The flag; default ``--`` + the field name with dashes."""
    many: bool = False
    """The flag takes one or more values (``nargs='+'``, commas also separate)."""
    note: str | None = None
    """Appended to the field's docstring in the help (what the CLI adds, e.g. the allowed range)."""

    @property
    def name(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (and its bases), as one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_default(cls: type, name: str):
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def show(value) -> str:
    """A value as the command line writes it."""
    if isinstance(value, (tuple, list)):
        return " ".join(show(v) for v in value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)  # exact: the command must reproduce the value
    return str(value)


def _words(value) -> list[str]:
    return [show(v) for v in value] if isinstance(value, (tuple, list)) else [show(value)]


def help_text(cls: type, flag: Flag) -> str:
    doc = field_docs(cls).get(flag.field, "")
    note = f" {flag.note}" if flag.note else ""
    default = field_default(cls, flag.field)
    return f"{doc}{note} (default: {show(default)})".replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, cls: type, flags: Iterable[Flag]) -> None:
    """One argument per flag; not given, it stays None and the dataclass default applies."""
    for flag in flags:
        default = field_default(cls, flag.field)  # a typo in a field name fails here, at parser build time
        if flag.parse is None:
            if default is not False:
                raise ValueError(f"{cls.__name__}.{flag.field}: a switch needs a field whose default is False")
            parser.add_argument(flag.name, dest=flag.field, action="store_true", default=None, help=field_docs(cls).get(flag.field, ""))
            continue
        parser.add_argument(flag.name, dest=flag.field, default=None, nargs="+" if flag.many else None,
                            metavar=flag.field.upper(), help=help_text(cls, flag))


def values(args: argparse.Namespace | Mapping, flags: Iterable[Flag]) -> dict:
    """The parsed value of each flag that was given (the rest keep the dataclass default)."""
    raw = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {f.field: raw[f.field] if f.parse is None else f.parse(raw[f.field], f.name) for f in flags if raw.get(f.field) is not None}


def build(cls: type, args: argparse.Namespace | Mapping, flags: Iterable[Flag], **extra):
    """``cls`` from the flags given plus ``extra`` fields; raises ConfigError naming what is wrong."""
    return cls(**{**values(args, flags), **extra})


def command_line(params, flags: Iterable[Flag], all_values: bool = False) -> list[str]:
    """The flags that reproduce ``params`` (those at their default left out unless ``all_values``)."""
    cls = type(params)
    out: list[str] = []
    for flag in flags:
        value = getattr(params, flag.field)
        default = field_default(cls, flag.field)
        if not all_values and _same(value, default):
            continue
        if flag.parse is None:
            out += [flag.name] if value else []
        else:
            out += [flag.name, *_words(value)] if flag.many else [flag.name, show(value)]
    return out


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
