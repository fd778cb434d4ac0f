"""Scores of many SAEs at once on a Ray cluster (``python -m saesteer scores --layers … --ray [ADDRESS]``).

The work splits the way :func:`saesteer.features.compute_many` already caches it:

- one task per (SAE, chunk of ``OUTPUT_CHUNK`` features): that chunk's logit lens and, unless only input
  scores are asked for, its output scores — exactly the call a local run makes for that chunk;
- one task per (corpus shard, group of SAEs): one activation pass over the shard's sequences for every SAE of
  the group (one forward serves all their layers); the shards' statistics are merged exactly
  (:func:`saesteer.activations.merge_stats`; shards start at multiples of the pass's batch, so each batch is the
  batch a local pass runs).

The driver writes every result into the content-hashed cache as it arrives, under the keys and file names a
local run uses (:func:`saesteer.features.cache_keys`), so a killed job resumes with the missing tasks only, and
the finished job is assembled by :func:`compute_many` itself from the cache: the same FeatureData as a local run.

Workers load the model and each SAE once per process (:func:`_worker_objects`), not once per task. Ray is
imported only here, and only when a job runs: ``scores`` without ``--ray`` never imports it.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from . import store as store_mod
from .activations import AFTER, TOP_N, WINDOW, ActivationStats, merge_stats
from .config import ClusterParams, ModelSpec, SaeSpec, ScoreParams

#: The Ray release this code is tested with (requirements.txt pins it).
RAY_PIN = "ray==2.60.0"

Progress = Callable[[int, int, str], None]
"""progress(done, total, what): tasks done of the whole job, and what the last one was."""


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached; the message says what to do."""


class JobFailed(RuntimeError):
    """Some tasks failed; what the others computed is saved, so rerunning the same command resumes."""


class Loader(Protocol):
    """What a worker needs to rebuild the model and an SAE from (picklable, hashable, small)."""

    def model(self): ...

    def sae(self, ref, lm): ...


@dataclass(frozen=True)
class SpecLoader:
    """The model and SAEs from their specs, as the CLI loads them (each worker loads from its own caches)."""

    spec: ModelSpec

    def model(self):
        from .models import load_model

        return load_model(self.spec)

    def sae(self, ref: SaeSpec, lm):
        from .saes import load_sae

        return load_sae(ref, lm, model_name=self.spec.name)


# ---------------------------------------------------------------------------------------------------
# Ray: import, connect


def import_ray():
    """The ``ray`` module, or :class:`RayUnavailable` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(f"--ray needs Ray, which is not installed ({exc}): pip install '{RAY_PIN}' (or run without --ray)") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A clear error for an address nothing listens on, before Ray's own (slow, verbose) retries."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailable(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, ray://10.0.0.5:10001 or auto)")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayUnavailable(
            f"no Ray cluster at {address} ({exc.__class__.__name__}: {exc}); start one with `ray start --head` on that "
            "machine and pass the address it prints, or give --ray without an address for a local cluster"
        ) from None


def _worker_env() -> dict:
    """Workers import this very saesteer (a checkout's src, not another install) and use ``cpus_per_task`` threads."""
    src = str(Path(__file__).resolve().parents[1])
    paths = [src, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src)]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def connect(cluster: ClusterParams):
    """Connect to ``cluster.address`` or start a local cluster (this machine's CPUs, and GPUs when CUDA is
    present); reuses a connection this process already has. Returns the ``ray`` module."""
    ray = import_ray()
    if cluster.address is not None:
        _check_reachable(cluster.address)
    if ray.is_initialized():
        return ray
    kwargs = dict(runtime_env=_worker_env(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    if cluster.address is None:
        import torch

        # address="local": always a new cluster of this process, never one that `ray start` left running here
        kwargs.update(address="local", num_cpus=cluster.num_cpus or os.cpu_count() or 1,
                      num_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    else:
        kwargs["address"] = cluster.address
    attempts = 2 if cluster.address is None else 1  # Ray gives a starting node 30 s; a loaded machine can miss that once
    for attempt in range(attempts):
        try:
            ray.init(**kwargs)
            return ray
        except Exception as exc:  # noqa: BLE001 - Ray raises bare Exception for a node that did not start in time
            ray.shutdown()
            if attempt + 1 == attempts:
                where = cluster.address or "a local cluster"
                raise RayUnavailable(f"cannot start or reach Ray at {where}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    return ray


# ---------------------------------------------------------------------------------------------------
# Worker side


_WORKER: dict = {}
_MODEL_LOADS = 0  # models this process has loaded (a test checks: one per worker, however many tasks it ran)


def _worker_objects(loader: Loader, ref):
    """(model, SAE) for this worker process: the model once per loader, each SAE once per (loader, ref)."""
    global _MODEL_LOADS
    entry = _WORKER.get(loader)
    if entry is None:
        _WORKER.clear()  # one model per worker: another job's model is dropped
        entry = _WORKER[loader] = {"lm": loader.model(), "saes": {}}
        _MODEL_LOADS += 1
    saes = entry["saes"]
    if ref not in saes:
        saes[ref] = loader.sae(ref, entry["lm"])
    return entry["lm"], saes[ref]


def _set_threads(n: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


def _chunk_task(loader: Loader, ref, start: int, stop: int, params: ScoreParams, with_output: bool, threads: float, kill: bool = False):
    """Logit lens (and output scores) of features start..stop-1 of one SAE, as arrays ready to store."""
    from .features import OUTPUT_CHUNK, output_to_arrays
    from .scores import logit_lens, output_scores

    if kill:  # fault injection for the tests: this worker process dies as a crashed or preempted one would
        os._exit(1)
    _set_threads(threads)
    lm, sae = _worker_objects(loader, ref)
    feats = np.arange(start, stop, dtype=np.int64)
    lens = logit_lens(lm, sae, k=params.top_k, features=feats)
    out = {"lens": {"features": lens.features, "top_ids": lens.top_ids, "top_logits": lens.top_logits,
                    "bottom_ids": lens.bottom_ids, "bottom_logits": lens.bottom_logits}}
    if with_output:
        batch = ScoreParams(params.prompt, params.amp, params.top_k, min(params.batch_size, OUTPUT_CHUNK))
        out["output"] = output_to_arrays(output_scores(lm, sae, batch, features=feats, lens=lens))
    out["pid"], out["model_loads"] = os.getpid(), _MODEL_LOADS
    return out


def _shard_task(loader: Loader, refs: tuple, sequences: list[list[int]], first: int, batch_sequences: int,
                top_n: int, window: int, after: int, threads: float, kill: bool = False):
    """Activation statistics of one corpus shard for several SAEs (one forward per batch serves them all)."""
    from .activations import activation_pass
    from .features import stats_to_arrays

    if kill:  # fault injection for the tests, as in _chunk_task
        os._exit(1)
    _set_threads(threads)
    lm, saes = None, []
    for ref in refs:
        lm, sae = _worker_objects(loader, ref)
        saes.append(sae)
    stats = activation_pass(lm, saes, sequences, None, batch_sequences, top_n, window, after, first_sequence=first)
    return {"stats": [stats_to_arrays(s) for s in stats], "pid": os.getpid(), "model_loads": _MODEL_LOADS}


# ---------------------------------------------------------------------------------------------------
# Driver side


@dataclass
class JobReport:
    """What a job did: tasks run now, tasks whose results were already cached, and the worker processes used."""

    submitted: int = 0
    cached: int = 0
    chunk_tasks: list[tuple[str, int]] = field(default_factory=list)
    shard_tasks: list[tuple[int, int]] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    model_loads: dict[int, int] = field(default_factory=dict)
    """Per worker process: how many times it loaded the model (1 when it is loaded once per worker)."""


def _shard_name(start: int, stop: int) -> str:
    return f"shards/{start:08d}-{stop:08d}.npz"


def _chunk_name(kind: str, start: int, stop: int) -> str:
    return f"{kind}/{start:08d}-{stop:08d}.npz"


def _have(store: store_mod.Store, key: str, name: str, n: int, per_item: Sequence[str] | None = None) -> bool:
    """Whether ``name`` is cached whole: it loads, and its arrays named in ``per_item`` (all of them when None)
    have one row per item, ``n`` in all. A shard names its per-latent arrays: its counts are scalars and its
    histogram edges are not per latent."""
    part = store.load_arrays(key, name)
    if part is None:
        return False
    names = part.keys() if per_item is None else per_item
    return all(k in part and part[k].ndim >= 1 and len(part[k]) == n for k in names)


def _groups(saes: Sequence, width: int) -> list[list[int]]:
    """Indices of ``saes`` packed in order into groups of at most ``width`` latents (an SAE wider alone)."""
    groups: list[list[int]] = []
    used = 0
    for i, s in enumerate(saes):
        if groups and used + s.width <= width:
            groups[-1].append(i)
            used += s.width
        else:
            groups.append([i])
            used = s.width
    return groups


def run_job(
    lm,
    saes: Sequence,
    refs: Sequence,
    loader: Loader,
    corpus_sequences=None,
    params: ScoreParams | None = None,
    n_tokens: int | None = None,
    only: str = "all",
    store: store_mod.Store | None = None,
    corpus_name: str = "",
    cluster: ClusterParams | None = None,
    progress: Progress | None = None,
    batch_sequences: int = 32,
    top_n: int = TOP_N,
    window: int = WINDOW,
    after: int = AFTER,
    kill: tuple[str, int] | None = None,
    kill_shard: int | None = None,
) -> tuple[list, JobReport]:
    """Feature data of every SAE in ``saes`` (``refs[i]`` rebuilds ``saes[i]`` on a worker through ``loader``),
    computed on a Ray cluster and cached; returns (FeatureData list, :class:`JobReport`).

    The driver holds ``lm`` and ``saes`` only to compute the cache keys (weight fingerprints) and to assemble
    the result; all scoring runs in tasks. Cached chunks and shards are not submitted again. A task that fails
    (after ``cluster.max_retries`` retries of a dead worker) does not stop the others: everything that finished
    is saved, then :class:`JobFailed` names what is missing. ``kill=(sae_id, start)`` makes that chunk's worker
    die, ``kill_shard=start`` the worker of the corpus shard starting at that sequence (fault injection, for tests).
    """
    from .features import (DEFAULT_TOKENS, OUTPUT_CHUNK, STATS_PER_LATENT, cache_keys, check_only, compute_many,
                           corpus_pass_sequences, stats_from_arrays, stats_to_arrays)

    params = params or ScoreParams()
    cluster = cluster or ClusterParams()
    check_only(only, corpus_sequences)
    if len(saes) != len(refs) or not saes:
        raise ValueError("give one ref per SAE, and at least one SAE")
    ids = [s.id for s in saes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"SAE ids must be distinct, got {ids}")
    store = store or store_mod.Store()
    if not store.enabled:
        raise ValueError("a distributed job writes its results into the feature cache: it cannot run with the cache disabled")
    n_tokens = DEFAULT_TOKENS if n_tokens is None and only != "output" else n_tokens

    fp_model = store_mod.model_fingerprint(lm)
    fps = [store_mod.sae_fingerprint(s) for s in saes]
    seqs, corpus_fp = corpus_pass_sequences(lm, corpus_sequences, n_tokens, only)
    keys = [cache_keys(fp_model, fp, params, corpus_fp, only, top_n, window, after) for fp in fps]

    # what is missing
    chunks: list[tuple[int, int, int, bool]] = []  # (sae index, start, stop, with output)
    report = JobReport()
    for i, s in enumerate(saes):
        lens_done = _have(store, keys[i].lens, "lens.npz", s.width)
        for start in range(0, s.width, OUTPUT_CHUNK):
            stop = min(start + OUTPUT_CHUNK, s.width)
            need_lens = not lens_done and not _have(store, keys[i].lens, _chunk_name("lens", start, stop), stop - start)
            need_out = only != "input" and not _have(store, keys[i].output, _chunk_name("output", start, stop), stop - start)
            if need_lens or need_out:
                chunks.append((i, start, stop, need_out))
            else:
                report.cached += 1
    shards: list[tuple[list[int], int, int]] = []  # (sae indices still missing it, start, stop)
    if only != "output":
        step = -(-max(cluster.shard_sequences, 1) // batch_sequences) * batch_sequences
        merged = [store.has(keys[i].activations, "activations.npz") for i in range(len(saes))]
        for members in _groups(saes, cluster.group_width):
            for start in range(0, len(seqs), step):
                stop = min(start + step, len(seqs))
                need = [i for i in members if not merged[i]
                        and not _have(store, keys[i].activations, _shard_name(start, stop), saes[i].width, STATS_PER_LATENT)]
                if need:
                    shards.append((need, start, stop))
                else:
                    report.cached += 1

    total = len(chunks) + len(shards)
    if progress:
        progress(0, total, f"{report.cached} tasks' results already cached")
    failures: list[str] = []
    if total:
        ray = connect(cluster)
        gpus = cluster.gpus_per_task
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        opts = dict(num_cpus=cluster.cpus_per_task, num_gpus=gpus, max_retries=cluster.max_retries)
        # max_calls=0: a worker serves any number of tasks (Ray's default for GPU tasks is one, which would
        # reload the model for every chunk)
        chunk_fn = ray.remote(max_calls=0)(_chunk_task).options(**opts)
        shard_fn = ray.remote(max_calls=0)(_shard_task).options(**opts)
        loader_ref = ray.put(loader)
        pending: dict = {}
        for i, start, stop, with_out in chunks:
            doomed = kill is not None and kill == (saes[i].id, start)
            ref = chunk_fn.remote(loader_ref, refs[i], start, stop, params, with_out, cluster.cpus_per_task, doomed)
            pending[ref] = ("chunk", i, start, stop, with_out)
            report.chunk_tasks.append((saes[i].id, start))
        for members, start, stop in shards:
            ref = shard_fn.remote(loader_ref, tuple(refs[i] for i in members), seqs[start:stop], start, batch_sequences,
                                  top_n, window, after, cluster.cpus_per_task, kill_shard == start)
            pending[ref] = ("shard", members, start, stop)
            report.shard_tasks.append((start, stop))
        report.submitted = total
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - a task's own error or its worker's death: record, keep the rest
                failures.append(_describe(task, saes) + f": {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            report.pids.add(int(result["pid"]))
            report.model_loads[int(result["pid"])] = int(result["model_loads"])
            if task[0] == "chunk":
                _, i, start, stop, with_out = task
                store.save_arrays(keys[i].lens, _chunk_name("lens", start, stop), result["lens"], compress=False)
                if with_out:
                    store.save_arrays(keys[i].output, _chunk_name("output", start, stop), result["output"], compress=False)
            else:
                _, members, start, stop = task
                for i, arrays in zip(members, result["stats"]):
                    store.save_arrays(keys[i].activations, _shard_name(start, stop), arrays)
            done += 1
            if progress:
                progress(done, total, _describe(task, saes))
    if failures:
        raise JobFailed(f"{len(failures)} of {total} tasks failed ({failures[0]}{'; …' if len(failures) > 1 else ''}); "
                        f"the other {total - len(failures)} are saved in the cache: rerun the same command to compute only what is missing")

    # assemble each SAE's whole-SAE files from its chunks and shards, as a local run would have written them
    for i, s in enumerate(saes):
        if not _have(store, keys[i].lens, "lens.npz", s.width):
            parts = [store.load_arrays(keys[i].lens, _chunk_name("lens", a, min(a + OUTPUT_CHUNK, s.width))) for a in range(0, s.width, OUTPUT_CHUNK)]
            store.save_arrays(keys[i].lens, "lens.npz", {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, compress=False)
        if only != "output" and not store.has(keys[i].activations, "activations.npz"):
            merged: ActivationStats | None = None
            step = -(-max(cluster.shard_sequences, 1) // batch_sequences) * batch_sequences
            for start in range(0, len(seqs), step):
                part = stats_from_arrays(s, store.load_arrays(keys[i].activations, _shard_name(start, min(start + step, len(seqs)))))
                merged = part if merged is None else merge_stats(merged, part)
            store.save_arrays(keys[i].activations, "activations.npz", stats_to_arrays(merged))
            for start in range(0, len(seqs), step):  # the merged file replaces the shards (each as large as it)
                store.discard(keys[i].activations, _shard_name(start, min(start + step, len(seqs))))
    data = compute_many(lm, list(saes), seqs, params, None, only=only, store=store, corpus_name=corpus_name,
                        batch_sequences=batch_sequences, top_n=top_n, window=window, after=after)
    return data, report


def _describe(task, saes) -> str:
    if task[0] == "chunk":
        _, i, start, stop, _ = task
        return f"SAE '{saes[i].id}' features {start}-{stop - 1}"
    _, members, start, stop = task
    return f"corpus sequences {start}-{stop - 1} for {len(members)} SAE(s)"


def tqdm_progress(desc: str = "scores (ray)"):
    """One tqdm bar over the whole job's tasks (on stderr); returns (progress callback, close)."""
    from tqdm.auto import tqdm

    bar = None

    def progress(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="task", file=sys.stderr)
        bar.set_postfix_str(what[:60], refresh=False)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return progress, close
