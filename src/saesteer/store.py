"""On-disk cache of computed feature data, keyed by content hashes.

Layout: ``<root>/<key>/<name>`` where key hashes everything the result depends on (model name + a weight
fingerprint, SAE weights, corpus tokens, parameters, the code's format version). Every data file is written to a
temporary file and moved into place with ``os.replace``; a sidecar ``<name>.sum.json`` written after it records
its size and sha256. A file without a matching sidecar (interrupted, truncated, corrupted) is treated as
missing, removed and recomputed. A cache root that cannot be written degrades to computing without caching,
with one warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .models import LoadedModel
from .paths import features_cache

#: Bump when the meaning or layout of cached results changes: old entries are then simply not found.
FORMAT_VERSION = 1

Progress = Callable[[int, int], None]


def default_root() -> Path:
    """``$SAESTEER_CACHE/features`` (default ``~/.cache/saesteer/features``)."""
    return features_cache()


# ---------------------------------------------------------------------------------------------------
# Content hashes


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def make_key(*parts) -> str:
    """Cache key of a computation from the (JSON-able) values it depends on."""
    return hash_json([FORMAT_VERSION, *parts])


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_fingerprint(lm: LoadedModel, samples: int = 4096) -> str:
    """Name, config and a strided sample of every parameter: cheap (milliseconds) yet changes with the weights."""
    h = hashlib.sha256()
    h.update(lm.name.encode())
    cfg = lm.model.config.to_dict() if hasattr(lm.model.config, "to_dict") else {}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in lm.model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(_tensor_bytes(flat[::step].float()))
    return h.hexdigest()[:24]


def sae_fingerprint(sae) -> str:
    """Hash of an SAE's full weights and config (``sae`` is a LoadedSae or a sae-lens SAE)."""
    module = getattr(sae, "sae", sae)
    h = hashlib.sha256()
    cfg = module.cfg.to_dict() if hasattr(module.cfg, "to_dict") else vars(module.cfg)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:24]


def tokens_fingerprint(sequences: list[list[int]] | np.ndarray) -> str:
    """Hash of token-id sequences (order and boundaries included)."""
    h = hashlib.sha256()
    for s in sequences:
        arr = np.asarray(s, dtype=np.int64)
        h.update(len(arr).to_bytes(8, "little"))
        h.update(arr.tobytes())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------
# Files with checksums


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sum.json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``; then the sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, payload in ((path, data), (_sidecar(path), json.dumps({"bytes": len(data), "sha256": _sha256(data)}).encode())):
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would make shipped or shared files unreadable to others
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_verified(path: Path) -> bytes | None:
    """The bytes of ``path`` if its sidecar matches their size and hash, else None (missing or damaged)."""
    side = _sidecar(path)
    try:
        meta = json.loads(side.read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("bytes") != len(data) or meta.get("sha256") != _sha256(data):
        return None
    return data


def arrays_to_bytes(arrays: dict[str, np.ndarray], compress: bool = True) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getvalue()


def arrays_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def table_to_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def table_from_bytes(data: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------
# The store


class Store:
    """A cache directory; ``enabled=False`` (or a root that cannot be written) reads and writes nothing."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else default_root()
        self.enabled = enabled
        self.writable = enabled
        self._warned = False

    def path(self, key: str, name: str) -> Path:
        return self.root / key / name

    def _degrade(self, exc: OSError) -> None:
        self.writable = False
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"feature cache {self.root} is not writable ({exc.__class__.__name__}: {exc}); computing without caching",
                RuntimeWarning,
                stacklevel=3,
            )

    def _read(self, key: str, name: str, parse: Callable[[bytes], object]):
        if not self.enabled:
            return None
        path = self.path(key, name)
        if not path.exists():
            return None
        data = read_verified(path)
        if data is not None:
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - any parse failure of a verified file (another version's format) means recompute
                data = None
        self._discard(path)
        return None

    def has(self, key: str, name: str) -> bool:
        """Whether ``name`` is stored under ``key`` complete, judged without reading it: the file and its sidecar
        exist and the sidecar records the file's size. (A load still verifies the checksum: a damaged file of the
        right size is found then, and recomputed.)"""
        if not self.enabled:
            return False
        path = self.path(key, name)
        try:
            meta = json.loads(_sidecar(path).read_text())
            size = path.stat().st_size
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get("bytes") == size

    def discard(self, key: str, name: str) -> None:
        """Remove ``name`` under ``key`` and its sidecar, if present (nothing happens in a read-only cache)."""
        self._discard(self.path(key, name))

    def _discard(self, path: Path) -> None:
        if not self.writable:
            return
        for p in (path, _sidecar(path)):
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass

    def _write(self, key: str, name: str, data: bytes) -> bool:
        if not self.writable:
            return False
        try:
            atomic_write_bytes(self.path(key, name), data)
            return True
        except OSError as exc:
            self._degrade(exc)
            return False

    def load_arrays(self, key: str, name: str) -> dict[str, np.ndarray] | None:
        return self._read(key, name, arrays_from_bytes)

    def save_arrays(self, key: str, name: str, arrays: dict[str, np.ndarray], compress: bool = True) -> bool:
        return self._write(key, name, arrays_to_bytes(arrays, compress))

    def load_table(self, key: str, name: str) -> pd.DataFrame | None:
        return self._read(key, name, table_from_bytes)

    def save_table(self, key: str, name: str, frame: pd.DataFrame) -> bool:
        return self._write(key, name, table_to_bytes(frame))

    def load_json(self, key: str, name: str) -> dict | None:
        return self._read(key, name, lambda b: json.loads(b.decode()))

    def save_json(self, key: str, name: str, obj: dict) -> bool:
        return self._write(key, name, json.dumps(obj, sort_keys=True, default=str).encode())

    def chunked(
        self,
        key: str,
        name: str,
        n_items: int,
        chunk: int,
        compute: Callable[[int, int], dict[str, np.ndarray]],
        progress: Progress | None = None,
    ) -> dict[str, np.ndarray]:
        """Arrays over ``n_items`` items built chunk by chunk: ``compute(start, stop)`` returns arrays whose first
        axis covers items start..stop-1. Each chunk is saved as it is done, so an interrupted run resumes at the
        first missing chunk; damaged chunks are recomputed. Returns the chunks concatenated along axis 0."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n_items, chunk):
            stop = min(start + chunk, n_items)
            part_name = f"{name}/{start:08d}-{stop:08d}.npz"
            part = self.load_arrays(key, part_name)
            if part is None or any(len(v) != stop - start for v in part.values()):
                part = {k: np.asarray(v) for k, v in compute(start, stop).items()}
                self.save_arrays(key, part_name, part, compress=False)
            parts.append(part)
            if progress:
                progress(stop, n_items)
        if not parts:
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
