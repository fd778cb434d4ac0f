"""Where evaluation runs live and how a run folder is laid out: the one module that knows the files.

A run folder holds ``meta.json`` (what was run; ``experiment`` is "concepts" or "features"), ``units/``
(one ``NAME.parquet`` of generations and a ``NAME.json`` marker per finished unit; the marker is written
last, so a unit with a marker is complete), ``timings.jsonl`` (one record per unit) and, once finished, the
report tables. A *packed* run (shipped under ``assets/eval/results/``) keeps the unit records in one
``units.parquet`` and the generations in one ``generations.parquet``.

Default places: runs are written to ``$SAESTEER_CACHE/eval/<model>/<sae id>/`` (concept level) and
``.../<sae id>/features/`` (feature level); shipped results are read from ``paths.EVAL_RESULTS``
(``assets/eval/results/``).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths
from ..config import ConfigError
from ..paths import EVAL_ASSETS, eval_cache

#: The paper's 50 neutral prefixes of the feature-level experiment.
PAPER_PREFIXES = EVAL_ASSETS / "paper_prefixes.txt"
#: A packed run (:func:`saesteer.evaluation.results.pack_results`) keeps its unit records in one file instead of ``units/``.
PACKED_UNITS = "units.parquet"
FEATURES_SUBDIR = "features"


def read_list(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, without those starting with '#'."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: give a text file with one entry per line")
    return [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip() and not s.lstrip().startswith("#")]


def default_concepts() -> list[str]:
    return read_list(EVAL_ASSETS / "concepts.txt")


def default_prefixes() -> list[str]:
    return read_list(EVAL_ASSETS / "prefixes.txt")


def slug(concept: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-")[:40] or "concept"
    return f"{base}-{zlib.crc32(concept.encode()):08x}"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=json_default))
    tmp.replace(path)


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def default_out_dir(model_name: str, sae_id: str) -> Path:
    """Where ``eval`` writes by default: ``$SAESTEER_CACHE/eval/<model>/<sae id>``."""
    def safe(name: str) -> str:
        return name.replace("/", "__").replace(":", "_")

    return eval_cache() / safe(model_name) / safe(sae_id)


def eval_roots() -> list[Path]:
    """Where :func:`list_runs` looks by default: the cache's ``eval/`` (where ``eval`` writes unless given
    ``--out``) and the results shipped under ``assets/eval/results/`` (``paths.EVAL_RESULTS``)."""
    return [eval_cache(), paths.EVAL_RESULTS]


def list_runs(roots: Sequence[str | Path] | None = None) -> list[Path]:
    """Evaluation directories (holding meta.json and units/, or a packed run's units.parquet) under ``roots``
    (default :func:`eval_roots`), at any depth; sorted by path, numbers in natural order (L2 before L11)."""
    roots = eval_roots() if roots is None else [Path(r) for r in roots]
    found = {p.parent for r in roots if Path(r).exists() for p in Path(r).rglob("meta.json")
             if (p.parent / "units").is_dir() or (p.parent / PACKED_UNITS).is_file()}
    # natural order: L2 before L11
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def feature_runs(roots: Sequence[str | Path] | None = None) -> list[Path]:
    """Feature-level run directories under ``roots`` (default :func:`eval_roots`), in natural order."""
    return [p for p in list_runs(roots) if run_kind(p) == "features"]


def concept_runs(roots: Sequence[str | Path] | None = None) -> list[Path]:
    """Concept-level run directories under ``roots`` (default :func:`eval_roots`), in natural order."""
    return [p for p in list_runs(roots) if run_kind(p) == "concepts"]


def run_kind(out: str | Path) -> str:
    """"features" or "concepts" (runs written before the feature level existed are concept level)."""
    try:
        return json.loads((Path(out) / "meta.json").read_text()).get("experiment", "concepts")
    except (OSError, ValueError):
        return "concepts"


def read_meta(out: str | Path) -> dict:
    path = Path(out) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{out} holds no evaluation (no meta.json): run `python -m saesteer eval` first")
    return json.loads(path.read_text())


def write_meta(out: str | Path, meta: dict) -> None:
    write_json(Path(out) / "meta.json", meta)


def open_run(out: str | Path, fresh: dict, resume: bool, same: Sequence[str]) -> dict:
    """Start the run folder ``out`` with ``fresh`` as its meta.json, or continue it when ``resume`` and the
    keys ``same`` match what it was run with (a clear error otherwise). Returns the meta to keep writing."""
    out = Path(out)
    units = out / "units"
    meta_path = out / "meta.json"
    if meta_path.exists() or (units.exists() and any(units.iterdir())):
        if not resume:
            raise ConfigError(f"{out} already holds evaluation results: pass --resume to continue them, or choose another --out")
        old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        diff = [k for k in same if k in fresh and old.get(k) != json.loads(json.dumps(fresh[k], default=json_default))]
        if diff:
            raise ConfigError(f"cannot resume {out}: it was run with different {', '.join(diff)}; use the same settings or another --out")
        for k, v in old.items():
            fresh.setdefault(k, v)
    units.mkdir(parents=True, exist_ok=True)
    write_meta(out, fresh)
    return fresh


def unit_done(out: str | Path, name: str) -> bool:
    return (Path(out) / "units" / f"{name}.json").exists()


def save_unit(out: str | Path, name: str, info: dict, rows: pd.DataFrame | None) -> None:
    """Write one unit: its rows, then the JSON marker that says it is complete."""
    base = Path(out) / "units" / name
    if rows is not None:
        write_parquet(base.with_suffix(".parquet"), rows)
    write_json(base.with_suffix(".json"), info)


def unit_records(out: str | Path) -> list[dict]:
    """The records of a run folder's finished units (their JSON markers), without their rows."""
    return [json.loads(j.read_text()) for j in sorted((Path(out) / "units").glob("*.json"))]


def read_units(out: str | Path) -> tuple[list[dict], list[pd.DataFrame]]:
    """(unit records, their row frames) of a run folder: from ``units/`` or, packed, from one file each."""
    out = Path(out)
    if not (out / "units").is_dir() and (out / PACKED_UNITS).is_file():
        units = pd.read_parquet(out / PACKED_UNITS)
        gens = out / "generations.parquet"
        return units.to_dict("records"), [pd.read_parquet(gens)] if gens.exists() else []
    recs, frames = [], []
    for j in sorted((out / "units").glob("*.json")):
        recs.append(json.loads(j.read_text()))
        pq = j.with_suffix(".parquet")
        if pq.exists():
            frames.append(pd.read_parquet(pq))
    return recs, frames


def read_parquet_if(*paths: Path) -> pd.DataFrame:
    """The first of ``paths`` that exists, read; an empty frame when none does."""
    for p in paths:
        if Path(p).exists():
            return pd.read_parquet(p)
    return pd.DataFrame()


def append_timing(out: str | Path, record: dict) -> None:
    with open(Path(out) / "timings.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=json_default) + "\n")


def read_timings(out: str | Path) -> pd.DataFrame:
    path = Path(out) / "timings.jsonl"
    return pd.read_json(path, lines=True) if path.exists() and path.stat().st_size else pd.DataFrame()
