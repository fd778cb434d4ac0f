"""Neuronpedia: a link to a feature's page, and activation exports as the top contexts of the input score.

**Link.** sae-lens' directory gives many releases a Neuronpedia id per SAE (e.g. Gemma Scope 2's
``gemma-3-270m/12-gemmascope-2-res-16k``); sae-lens copies it into ``cfg.metadata.neuronpedia_id`` when it
loads the SAE. A feature's page is ``https://www.neuronpedia.org/<id>/<feature>``. Building the link sends
nothing anywhere.

**Exports.** The paper took each feature's top contexts from Neuronpedia: one JSON file per feature whose
``activations`` list holds records with ``tokens`` (strings) and ``values`` (the feature's activation at each
token), best first. Its input score (``input_score.py``) reads the first 100 records, skips features with
fewer than 10, takes each record's max-activating token (the first arg-max of ``values``), turns the token
string back into a token id (underscores read as spaces, tokenised, the first id kept) and counts how many
of those ids are among the feature's top logit-lens tokens. :func:`input_scores_from_exports` does the same
through :func:`saesteer.scores.input_scores`, the function our own corpus pass uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import Context
from .saes import LoadedSae
from .scores import INPUT_MAX_CONTEXTS, INPUT_MIN_CONTEXTS, LogitLens, input_scores

NEURONPEDIA_URL = "https://www.neuronpedia.org"
_NP_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_FILE_FEATURE = re.compile(r"^(?:\d+_)?(\d+)\.json$")
#: Largest export file read (a feature's 100+ records of a few hundred tokens are well below this).
MAX_EXPORT_BYTES = 64 * 2**20


class ExportError(ValueError):
    """A Neuronpedia export that cannot be read; the message names the file and what is wrong."""


def neuronpedia_id(sae: LoadedSae) -> str | None:
    """The SAE's Neuronpedia id as sae-lens' directory gives it (None when it has none)."""
    meta = getattr(sae.sae.cfg, "metadata", None)
    value = getattr(meta, "neuronpedia_id", None) if meta is not None else None
    return value if isinstance(value, str) and _NP_ID.fullmatch(value) else None


def feature_url(np_id: str, feature: int) -> str:
    """The Neuronpedia page of ``feature`` of the SAE ``np_id`` ('model/source')."""
    if not _NP_ID.fullmatch(np_id or ""):
        raise ValueError(f"{np_id!r} is not a Neuronpedia id of the form 'model/source'")
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or feature < 0:
        raise ValueError(f"feature must be a non-negative integer, got {feature!r}")
    return f"{NEURONPEDIA_URL}/{np_id}/{int(feature)}"


@dataclass(frozen=True)
class ExportRecord:
    """One activating text of a feature: its tokens (as Neuronpedia shows them) and the activation at each."""

    tokens: tuple[str, ...]
    values: tuple[float, ...]

    @property
    def max_index(self) -> int:
        """The first position of the largest value (what ``np.argmax`` returns in the paper's code)."""
        return int(np.argmax(self.values))

    @property
    def max_value(self) -> float:
        return float(self.values[self.max_index])


def _records(obj: object, where: str) -> tuple[ExportRecord, ...]:
    acts = obj.get("activations") if isinstance(obj, Mapping) else None
    if not isinstance(acts, list):
        raise ExportError(f"{where}: a Neuronpedia feature export needs an 'activations' list of records with 'tokens' and 'values'")
    out = []
    for i, rec in enumerate(acts):
        tokens = rec.get("tokens") if isinstance(rec, Mapping) else None
        values = rec.get("values") if isinstance(rec, Mapping) else None
        if not isinstance(tokens, list) or not isinstance(values, list) or not all(isinstance(t, str) for t in tokens):
            raise ExportError(f"{where}: activation record {i} needs 'tokens' (a list of strings) and 'values' (a list of numbers)")
        if len(tokens) != len(values) or not tokens:
            raise ExportError(f"{where}: activation record {i} has {len(tokens)} tokens but {len(values)} values; they must match and not be empty")
        try:
            numbers = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise ExportError(f"{where}: activation record {i} has a value that is not a number") from None
        if not all(np.isfinite(numbers)):
            raise ExportError(f"{where}: activation record {i} has a value that is not finite")
        out.append(ExportRecord(tuple(tokens), numbers))
    return tuple(out)


def _feature_of(obj: Mapping, name: str | None, where: str) -> int:
    for key in ("index", "feature"):
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    m = _FILE_FEATURE.match(Path(name).name) if name else None
    if m:
        return int(m.group(1))
    raise ExportError(f"{where}: the export names no feature: give it an 'index' field, or name the file FEATURE.json or LAYER_FEATURE.json as the paper does")


def parse_export(text: str | bytes, name: str | None = None) -> dict[int, tuple[ExportRecord, ...]]:
    """Feature id -> its records, from one export file: one feature's JSON object, or a list of them. The
    feature id comes from the object's ``index`` (Neuronpedia's field) or from a file name ``[LAYER_]FEATURE.json``."""
    where = name or "the export"
    if len(text) > MAX_EXPORT_BYTES:
        raise ExportError(f"{where} is {len(text) / 2**20:.0f} MiB; exports of at most {MAX_EXPORT_BYTES // 2**20} MiB are read")
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{where} is not JSON: {exc}") from None
    items = obj if isinstance(obj, list) else [obj]
    out: dict[int, tuple[ExportRecord, ...]] = {}
    for i, item in enumerate(items):
        label = where if len(items) == 1 else f"{where}, item {i}"
        feature = _feature_of(item if isinstance(item, Mapping) else {}, name if len(items) == 1 else None, label)
        out[feature] = _records(item, label)
    return out


def read_exports(paths: Iterable[str | Path]) -> dict[int, tuple[ExportRecord, ...]]:
    """:func:`parse_export` of each file (a directory stands for its ``*.json`` files), merged."""
    out: dict[int, tuple[ExportRecord, ...]] = {}
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            try:
                text = f.read_bytes()
            except OSError as exc:
                raise ExportError(f"cannot read {f}: {exc.strerror or exc}") from None
            out.update(parse_export(text, str(f)))
    return out


def token_id(tokenizer, token: str) -> int | None:
    """The token id of a token string as the paper recovers it: underscores read as spaces, the string tokenised
    without special tokens, the first id kept; None if it tokenises to nothing. (On the embedded Gemma 3
    tokenizer, 99.8 % of 20,000 random token ids come back from their decoded string so.)"""
    ids = tokenizer(token.replace("_", " "), add_special_tokens=False).input_ids
    return int(ids[0]) if ids else None


def max_token_ids(records: Iterable[ExportRecord], tokenizer, limit: int = INPUT_MAX_CONTEXTS) -> np.ndarray:
    """Token id (-1 where none) of the max-activating token of each of the first ``limit`` records."""
    out = []
    for rec in list(records)[:limit]:
        tid = token_id(tokenizer, rec.tokens[rec.max_index])
        out.append(-1 if tid is None else tid)
    return np.asarray(out, dtype=np.int64)


def input_scores_from_exports(
    exports: Mapping[int, Iterable[ExportRecord]],
    lens: LogitLens,
    tokenizer,
    max_contexts: int = INPUT_MAX_CONTEXTS,
    min_contexts: int = INPUT_MIN_CONTEXTS,
) -> dict[int, float]:
    """Input score of each exported feature (NaN below ``min_contexts`` records), with T its top logit-lens
    tokens in ``lens``; features the lens does not cover are refused by name."""
    features = sorted(exports)
    missing = [f for f in features if f not in set(int(x) for x in lens.features)]
    if missing:
        raise ExportError(f"feature {missing[0]} of the export has no logit lens here: it is not among the scored features of this SAE")
    ids = [max_token_ids(exports[f], tokenizer, max_contexts) for f in features]
    width = max((len(x) for x in ids), default=0)
    matrix = np.full((len(features), max(width, 1)), -1, np.int64)
    for r, x in enumerate(ids):
        matrix[r, : len(x)] = x
    scores = input_scores(matrix, np.array([len(x) for x in ids]), lens.subset(features), max_contexts=max_contexts, min_contexts=min_contexts)
    return {f: float(s) for f, s in zip(features, scores)}


def contexts(records: Iterable[ExportRecord], limit: int | None = None) -> list[Context]:
    """The records as :class:`saesteer.features.Context` objects for the card's context view (no token ids)."""
    out = []
    for i, rec in enumerate(records):
        if limit is not None and i >= limit:
            break
        out.append(Context(tokens=list(rec.tokens), token_ids=[], acts=list(rec.values), max_pos=rec.max_index,
                           activation=rec.max_value, doc_index=-1))
    return out
