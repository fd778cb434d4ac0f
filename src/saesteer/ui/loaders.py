"""Every heavy object the app uses, loaded once per process through ``st.cache_resource``.

Models and SAEs are shared by all sessions (see the locking notes in ``steering.py``). Feature data comes
from the bundled assets, from the on-disk cache, or is computed by a background job that writes to the
cache, so a user can leave the page while it runs and come back to the result.

These are the real sources; ``sources.py`` sets the test fixture's beside them behind one interface.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st

from ..config import ModelSpec, SaeSpec
from ..models import LoadedModel
from ..paths import app_feature_dir, bundled_feature_dir, latest_app_feature_dir
from ..saes import LoadedSae


@dataclass(frozen=True)
class SaeChoice:
    """One SAE the layer picker offers."""

    layer: int
    label: str
    spec: SaeSpec
    ref: str
    """The value of the ``sae`` query parameter that names this SAE."""
    width: int | None = None
    metrics: dict | None = None
    """Quality of a bundled SAE on held-out text (fve, ce_loss_recovered, dead_fraction...)."""
    opens: bool = False
    """The SAE the picker starts on (the bundled one whose preset search found the most presets)."""


# ---------------------------------------------------------------------------------------------------
# Models and SAEs


@st.cache_resource(show_spinner="Loading the model (the first load of the embedded model takes about two minutes)…", max_entries=2)
def load_model(spec: ModelSpec) -> LoadedModel:
    """The model ``spec`` names (raises ModelLoadError / ConfigError with a message for the user)."""
    from ..models import load_model as _load

    return _load(spec)


def sae_choices(model_name: str, source: str = "bundled", release: str | None = None) -> list[SaeChoice]:
    """SAEs the layer picker offers: bundled ones of the model, or the SAEs of a sae-lens release."""
    if source == "bundled":
        from ..presets import opening_sae
        from ..saes import list_bundled

        entries = list_bundled(model_name)
        opens = opening_sae(model_name, [e["id"] for e in entries])
        return [
            SaeChoice(layer=e["layer"], label=f"layer {e['layer']} · {e['id']}", spec=SaeSpec(source="bundled", layer=e["layer"], sae_id=e["id"]),
                      ref=e["id"], width=e.get("width"), metrics=e.get("metrics"), opens=e["id"] == opens)
            for e in entries
        ]
    if source == "release" and release:
        return release_choices(release)
    return []


@st.cache_data(show_spinner=False)
def release_ids(release: str) -> list[str] | None:
    """SAE ids of a sae-lens release from sae-lens' packaged directory (no network), or None if unknown."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        return None
    return list(directory[release].saes_map)


_LAYER_IN_ID = re.compile(r"(?:layer|blocks?|l)[_.-]?(\d+)", re.IGNORECASE)


def release_choices(release: str) -> list[SaeChoice]:
    ids = release_ids(release) or []
    out = []
    for sae_id in ids:
        m = _LAYER_IN_ID.search(sae_id)
        layer = int(m.group(1)) if m else -1
        out.append(SaeChoice(layer=layer, label=f"layer {layer if layer >= 0 else '?'} · {sae_id}", spec=SaeSpec(source="release", release=release, sae_id=sae_id), ref=f"{release}:{sae_id}"))
    return sorted(out, key=lambda c: (c.layer, c.spec.sae_id))


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=16)
def load_sae(spec: SaeSpec, model_spec: ModelSpec, _lm: LoadedModel) -> LoadedSae:
    """The SAE ``spec`` names, checked against the model (raises SaeLoadError with a message)."""
    from ..saes import load_sae as _load

    return _load(spec, _lm, model_name=model_spec.name)


# ---------------------------------------------------------------------------------------------------
# Feature data: bundled, cached, or computed by a background job


def cache_feature_dir(model_name: str, sae: LoadedSae) -> Path:
    """Where the app keeps feature data it computed, keyed by the SAE's weights (a changed SAE is recomputed)."""
    return app_feature_dir(model_name, sae.id, weights_fingerprint(sae))


def weights_fingerprint(sae: LoadedSae) -> str:
    """``store.sae_fingerprint`` of ``sae`` (what evaluation runs and saved feature data record), computed once
    per loaded SAE object: hashing the full weights takes a moment for a large SAE."""
    from ..store import sae_fingerprint

    if sae.sae not in _FINGERPRINTS:
        _FINGERPRINTS[sae.sae] = sae_fingerprint(sae)
    return _FINGERPRINTS[sae.sae]


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def subset_feature_dir(model_name: str, sae: LoadedSae) -> Path:
    """Where the app keeps feature data of a subset of the SAE's features (the latest subset scored)."""
    full = cache_feature_dir(model_name, sae)
    return full.with_name(full.name + "-subset")


def feature_data_dir(model_name: str, sae: LoadedSae) -> Path | None:
    """Where this SAE's feature data lies (bundled first, then the cache, then a subset), or None if nowhere yet."""
    for path in (bundled_feature_dir(model_name, sae.id), cache_feature_dir(model_name, sae), subset_feature_dir(model_name, sae)):
        if _has_data(path):
            return path
    return None


@st.cache_resource(show_spinner="Loading feature scores…", max_entries=12)
def _load_feature_dir(path: str, stamp: float):
    from ..features import FeatureData

    return FeatureData.load(Path(path))


def _has_data(path: Path) -> bool:
    return (path / "meta.json").exists()


def load_feature_data(model_name: str, sae: LoadedSae):
    """The FeatureData of ``sae`` if bundled or cached, else None (compute it with :func:`start_job`)."""
    path = feature_data_dir(model_name, sae)
    if path is None:
        return unsaved_feature_data(model_name, sae)
    return _load_feature_dir(str(path), (path / "meta.json").stat().st_mtime)


def data_key(data) -> str:
    """A content key of loaded feature data, for caches of what is derived from it (never ``id(data)``: an id
    is reused once its object is freed): a hash of its meta.json (which records the model, SAE, corpus and
    parameters' fingerprints) and of the features it covers (a subset differs from the full data)."""
    h = hashlib.sha256(json.dumps(data.meta, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(data.features, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def choice_sae_id(choice: SaeChoice) -> str:
    """The id :func:`saesteer.saes.load_sae` gives the SAE of ``choice`` (what its saved data is named by)."""
    spec = choice.spec
    if spec.source == "release":
        return f"{spec.release}/{spec.sae_id}"
    if spec.source == "local":
        return Path(spec.path).expanduser().name
    return spec.sae_id or choice.ref


def layer_tables(model_name: str, choices: list[SaeChoice], current: LoadedSae | None = None, current_data=None) -> dict[int, object]:
    """Scores tables of every offered SAE whose feature data is already available (nothing is computed)."""
    out = {}
    for choice in choices:
        if choice.spec.source == "bundled" and _has_data(bundled_feature_dir(model_name, choice.ref)):
            path = bundled_feature_dir(model_name, choice.ref)
            out[choice.layer] = _load_feature_dir(str(path), (path / "meta.json").stat().st_mtime).table
        elif (path := latest_app_feature_dir(model_name, choice_sae_id(choice))) is not None:  # e.g. from `scores --layers … --ray`
            try:
                out.setdefault(choice.layer, _load_feature_dir(str(path), (path / "meta.json").stat().st_mtime).table)
            except Exception:  # noqa: BLE001 - damaged saved data: the overview simply leaves that layer out
                pass
    if current is not None and current_data is not None:
        out[current.layer] = current_data.table
    return dict(sorted(out.items()))


@dataclass
class Job:
    """A feature-data computation running in a background thread (one per model + SAE per process)."""

    key: str
    target: Path
    progress: float = 0.0
    message: str = "starting"
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.time)
    thread: threading.Thread | None = field(default=None, repr=False)
    result: object | None = field(default=None, repr=False)
    """What ``work`` returned: feature data that could not be saved (kept in memory instead), else None."""

    @property
    def running(self) -> bool:
        return not self.done and self.error is None


class JobRegistry:
    """Background jobs shared by every session, so a job survives its page being left."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def start(self, key: str, target: Path, work: Callable[[Callable[[float, str], None]], object]) -> Job:
        """Run ``work(report)`` in a thread unless a job with ``key`` is already running; ``report(fraction, message)``.
        What ``work`` returns is kept as ``job.result``."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.running:
                return job
            job = Job(key=key, target=target)
            self._jobs[key] = job

        def report(fraction: float, message: str = "") -> None:
            job.progress = min(1.0, max(0.0, float(fraction)))
            if message:
                job.message = message

        def run() -> None:
            try:
                job.result = work(report)
                job.progress, job.message, job.done = 1.0, "done", True
            except Exception as exc:  # shown to the user in the page; the app stays up
                job.error = f"{exc.__class__.__name__}: {exc}"
                job.message = "".join(traceback.format_exception_only(exc)).strip()

        job.thread = threading.Thread(target=run, name=f"saesteer-job-{key[:24]}", daemon=True)
        job.thread.start()
        return job


@st.cache_resource(show_spinner=False)
def jobs() -> JobRegistry:
    return JobRegistry()


def job_key(model_name: str, sae: LoadedSae) -> str:
    return f"{model_name}|{sae.id}|{sae.hook_name}"


def start_feature_job(model_name: str, lm: LoadedModel, sae: LoadedSae, n_tokens: int = 200_000, features: Sequence[int] | None = None) -> Job:
    """Compute feature data for ``sae`` over the bundled corpus in the background and save it to the cache.

    The scoring pipeline caches its intermediate results too, so an interrupted job resumes where it stopped.
    When the cache cannot be written, the result stays in memory (``job.result``) until the server restarts.
    ``features``: only these feature ids, on the SAE restricted to them (``subsets.compute_subset``).
    """
    target = cache_feature_dir(model_name, sae) if features is None else subset_feature_dir(model_name, sae)

    def work(report: Callable[[float, str], None]) -> None:
        from ..corpus import pack_sequences
        from ..corpus import iter_bundled
        from ..features import compute_many

        def progress(stage: str, done: int, total: int | None) -> None:
            report(done / total if total else 0.0, f"{stage}: {done:,}" + (f" of {total:,}" if total else ""))

        sequences = pack_sequences(lm.tokenizer, iter_bundled("train"), 128)
        if features is not None:
            from ..subsets import compute_subset

            data = compute_subset(lm, sae, features, sequences, n_tokens=n_tokens, progress=progress, corpus_name="bundled")
        else:
            data = compute_many(lm, [sae], sequences, n_tokens=n_tokens, progress=progress, corpus_name="bundled")[0]
        try:
            data.save(target)
        except OSError:  # a read-only cache: keep the result in memory for this process (the page says so)
            return data
        return None

    return jobs().start(job_key(model_name, sae), target, work)


def unsaved_feature_data(model_name: str, sae: LoadedSae):
    """Feature data a finished job computed but could not save (the cache is not writable), else None."""
    job = jobs().get(job_key(model_name, sae))
    return job.result if job is not None and job.done else None


# ---------------------------------------------------------------------------------------------------
# Evaluation runs (written by ``python -m saesteer eval``; read-only here)


def eval_stamp(path: Path) -> tuple:
    """Changes whenever the run in ``path`` writes: units land in units/ by atomic renames, meta.json is rewritten."""
    stamp = []
    for p in (path / "meta.json", path / "units", path / "timings.jsonl", path / "methods.csv"):
        try:
            stamp.append(p.stat().st_mtime_ns)
        except OSError:
            stamp.append(None)
    return tuple(stamp)


@st.cache_data(show_spinner="Reading the evaluation…", max_entries=16)
def load_eval(path: str, stamp: tuple):
    """``evaluate.load_results`` of ``path``, cached until the run writes again (errors are raised, not cached)."""
    from ..evaluation import load_results

    return load_results(path)


@st.cache_resource(show_spinner=False, max_entries=16)
def eval_figures(path: str, stamp: tuple) -> dict:
    """``evaluate.figures`` of the run in ``path``, built once per write of the run (≈ 0.7 s for a 30-concept
    run) and shared read-only by the sessions that show it."""
    from ..evaluation import figures

    return figures(load_eval(path, stamp))
