"""Shareable view state: what the URL's query parameters may carry, and their validation (no Streamlit here).

A URL is input from anyone who sends a link, so every value is checked: numbers are parsed and bounded,
hub ids and sae-lens names must look like names, and filesystem paths are accepted only inside the
allowed roots (the bundled assets and the saesteer cache); anything else is refused with a message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import EMBEDDED_MODEL, MAX_ABS_STRENGTH, MAX_CONCEPT_CHARS

PARAMS = ("model", "sae", "layer", "feature", "prompt", "strength", "mode", "concept", "seed", "present")
MAX_PROMPT_CHARS = 2000
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_NAME = re.compile(r"^[\w.-]{1,128}$")
_RELEASE = re.compile(r"^([\w.-]{1,128}):([\w.-]+(?:/[\w.-]+){0,6})$")


@dataclass(frozen=True)
class ViewState:
    """What a shared link reproduces. ``None`` means "not given": the app's default applies."""

    model: str | None = None
    """'gemma-3-270m', a hub id, or a local model directory under an allowed root."""
    sae: str | None = None
    """A bundled SAE id, 'RELEASE:SAE_ID' (sae-lens), or a local SAE directory under an allowed root."""
    layer: int | None = None
    feature: int | None = None
    prompt: str | None = None
    strength: float | None = None
    mode: str | None = None
    """'paper' or 'additive'."""
    concept: str | None = None
    """The concept duel's concept (a word or short phrase)."""
    seed: int | None = None
    """The concept duel's sampling seed."""
    present: bool | None = None
    """The concept duel's presenter view (large type, sidebar collapsed)."""

    def to_params(self) -> dict[str, str]:
        """Query-parameter strings for the fields that are set."""
        out = {}
        for key, value in asdict(self).items():
            if value is None or (key == "present" and not value):
                continue
            out[key] = "1" if value is True else f"{value:g}" if isinstance(value, float) else str(value)
        return out


@dataclass
class ParsedState:
    state: ViewState
    problems: list[str] = field(default_factory=list)
    """One message per refused parameter, naming the value and what is allowed."""


def is_within(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` (after resolving symlinks and '..') lies inside one of ``roots``."""
    try:
        resolved = path.expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    for root in roots:
        try:
            resolved.relative_to(Path(root).expanduser().resolve())
            return True
        except ValueError:
            continue
    return False


def looks_like_path(value: str) -> bool:
    return value.startswith(("/", "~", ".")) or "\\" in value or ".." in value


def check_path(value: str, roots: Sequence[Path], what: str) -> str | None:
    """Problem message for a path from a URL, or None when it is inside an allowed root."""
    if is_within(Path(value), roots):
        return None
    allowed = ", ".join(str(r) for r in roots)
    return (f"{what} path {value!r} is outside the allowed folders ({allowed}); copy it there, or ask whoever runs "
            "the app to add its folder to SAESTEER_ALLOWED_ROOTS")


def _first(value: str | Sequence[str]) -> str:
    if isinstance(value, str):
        return value
    return value[-1] if value else ""


def _int(value: str, name: str, upper: int = 10_000_000) -> int:
    if not re.fullmatch(r"\d{1,9}", value.strip()):
        raise ValueError(f"{name} must be a non-negative integer, got {value[:40]!r}")
    number = int(value)
    if number >= upper:
        raise ValueError(f"{name} {number} is too large")
    return number


def parse_model(value: str, roots: Sequence[Path]) -> str:
    """Validate a model name from a URL: the embedded name, a hub id, or a directory under ``roots``."""
    value = value.strip()
    if value == EMBEDDED_MODEL:
        return value
    if looks_like_path(value) or Path(value).exists():
        problem = check_path(value, roots, "model")
        if problem:
            raise ValueError(problem)
        return value
    if _HUB_ID.fullmatch(value):
        return value
    raise ValueError(f"model {value[:80]!r} is not '{EMBEDDED_MODEL}', a hub id like 'google/gemma-2-2b', or a directory under the allowed folders")


def parse_sae(value: str, roots: Sequence[Path]) -> str:
    """Validate an SAE reference from a URL: bundled id, RELEASE:SAE_ID, or a directory under ``roots``."""
    value = value.strip()
    if looks_like_path(value) or ("/" in value and ":" not in value):
        problem = check_path(value, roots, "SAE")
        if problem:
            raise ValueError(problem)
        return value
    if _RELEASE.fullmatch(value) or _NAME.fullmatch(value):
        return value
    raise ValueError(f"SAE {value[:80]!r} is not a bundled id, 'RELEASE:SAE_ID', or a directory under the allowed folders")


def parse_query_params(params: Mapping[str, str | Sequence[str]], roots: Sequence[Path]) -> ParsedState:
    """Validated :class:`ViewState` from query parameters; refused values are dropped and explained."""
    values: dict[str, object] = {}
    problems: list[str] = []
    for key in PARAMS:
        if key not in params:
            continue
        raw = _first(params[key])
        if raw == "":
            continue
        try:
            if key == "model":
                values[key] = parse_model(raw, roots)
            elif key == "sae":
                values[key] = parse_sae(raw, roots)
            elif key in ("layer", "feature"):
                values[key] = _int(raw, key)
            elif key == "prompt":
                if len(raw) > MAX_PROMPT_CHARS:
                    raise ValueError(f"prompt is {len(raw)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
                values[key] = raw
            elif key == "strength":
                try:
                    number = float(raw)
                except ValueError:
                    raise ValueError(f"strength must be a number, got {raw[:40]!r}") from None
                if not math.isfinite(number) or abs(number) > MAX_ABS_STRENGTH:
                    raise ValueError(f"strength {raw[:40]!r} is out of range: use a finite number with |strength| <= {MAX_ABS_STRENGTH:g}")
                values[key] = number
            elif key == "concept":
                if len(raw) > MAX_CONCEPT_CHARS or not raw.strip():
                    raise ValueError(f"concept must be a word or short phrase of 1 to {MAX_CONCEPT_CHARS} characters, got {raw[:40]!r}")
                values[key] = raw.strip()
            elif key == "seed":
                values[key] = _int(raw, key, 2**31)
            elif key == "present":
                if raw not in ("0", "1", "true", "false"):
                    raise ValueError(f"present must be 1 or 0, got {raw[:40]!r}")
                values[key] = raw in ("1", "true")
            elif key == "mode":
                if raw not in ("paper", "additive"):
                    raise ValueError(f"mode {raw[:40]!r} is unknown: use 'paper' or 'additive'")
                values[key] = raw
        except ValueError as exc:
            problems.append(f"link parameter '{key}' ignored: {exc}")
    return ParsedState(ViewState(**values), problems)
