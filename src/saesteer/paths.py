"""Where things live: the shipped assets, the on-disk cache, the folders a user may load from, and the
environment variables that move them. Every path the package computes starts here.

Assets (read-only, shipped with the repository): ``assets/saes/<model>/`` (SAEs + ``manifest.json``),
``assets/features/<model>/<sae id>/`` (precomputed feature data), ``assets/corpus/`` (the bundled corpus),
``assets/eval/`` (default concepts and prefixes, shipped evaluation runs under ``results/``), ``assets/presets/``
(the demo presets found for the bundled SAEs).

Cache (written at run time, ``$SAESTEER_CACHE``, default ``~/.cache/saesteer``): ``models/`` (the embedded
model converted once), ``features/`` (the scoring pipeline's intermediate results), ``app-features/``
(feature data the app computed), ``eval/`` (evaluation runs), ``presets/`` (preset searches of other SAEs).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path

#: The cache root (default ``~/.cache/saesteer``).
CACHE_ENV = "SAESTEER_CACHE"
#: Extra folders (``os.pathsep``-separated) that paths typed into the app or put in a link may point into.
ROOTS_ENV = "SAESTEER_ALLOWED_ROOTS"
#: ``tiny``: the app runs on the tiny random model and SAEs of :mod:`saesteer.testing` (tests, demos of the UI).
FIXTURE_ENV = "SAESTEER_TEST_FIXTURE"
#: The LLM judge (:mod:`saesteer.judge`): an OpenAI-compatible server's base URL, its model name and key, or a
#: local model directory.
JUDGE_URL_ENV = "SAESTEER_JUDGE_URL"
JUDGE_MODEL_ENV = "SAESTEER_JUDGE_MODEL"
JUDGE_API_KEY_ENV = "SAESTEER_JUDGE_API_KEY"
JUDGE_LOCAL_ENV = "SAESTEER_JUDGE_LOCAL"

ASSETS = Path(__file__).resolve().parents[2] / "assets"
BUNDLED_SAES = ASSETS / "saes"
BUNDLED_FEATURES = ASSETS / "features"
BUNDLED_CORPUS = ASSETS / "corpus" / "prose.jsonl.xz"
EVAL_ASSETS = ASSETS / "eval"
#: Evaluation results shipped with the repository, one run per ``<model>/<sae id>/``.
EVAL_RESULTS = EVAL_ASSETS / "results"
#: Demo presets found by ``python -m saesteer presets`` for the bundled SAEs, one ``<model>/<sae id>.json`` each.
BUNDLED_PRESETS = ASSETS / "presets"


def bundled_sae_dir(model_name: str) -> Path:
    """Where SAEs bundled for ``model_name`` would live; hub ids and local paths map to a flat folder name."""
    return BUNDLED_SAES / model_name.strip("/").replace("/", "__")


def bundled_feature_dir(model_name: str, sae_id: str) -> Path:
    """Precomputed feature data shipped for a bundled SAE."""
    return BUNDLED_FEATURES / model_name / sae_id


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "saesteer"))


def model_cache(model_name: str) -> Path:
    """Where a model converted once (the embedded GGUF, de-quantised) is kept."""
    return cache_root() / "models" / model_name


def features_cache() -> Path:
    """The scoring pipeline's intermediate results (``store.ResultStore``)."""
    return cache_root() / "features"


def app_features_cache() -> Path:
    """Feature data the app computed for SAEs that ship without it."""
    return cache_root() / "app-features"


def eval_cache() -> Path:
    """Where ``eval`` writes unless given ``--out``."""
    return cache_root() / "eval"


def presets_cache() -> Path:
    """Where ``presets`` writes for SAEs that are not bundled (or with ``--cache``)."""
    return cache_root() / "presets"


def presets_file(root: Path, model_name: str, sae_id: str) -> Path:
    """The preset search's file for one SAE under ``root`` (``BUNDLED_PRESETS`` or ``presets_cache()``); the file
    names its model and SAE fingerprints, so a name shared by two SAEs is never read for the wrong one."""
    def safe(text: str) -> str:
        return re.sub(r"[^\w.-]+", "_", text.strip("/")).strip("_") or "_"

    return Path(root) / safe(model_name) / f"{safe(sae_id)}.json"


def allowed_roots() -> list[Path]:
    """Folders that model and SAE paths coming from a URL or typed into the app may point into: the bundled
    assets, the cache, and whatever the operator lists in ``$SAESTEER_ALLOWED_ROOTS`` (separated by
    ``os.pathsep``). Whoever runs the app decides which of the server's folders its users may load from."""
    extra = [Path(p).expanduser() for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [ASSETS, cache_root(), *extra]


def fixture_mode() -> str | None:
    """'tiny' when ``$SAESTEER_TEST_FIXTURE`` asks for the tiny test model, else None."""
    value = os.environ.get(FIXTURE_ENV, "").strip().lower()
    return value or None


def slug(text: str) -> str:
    """A folder name for any text (a model or SAE id): its safe characters, then a hash that keeps it unique."""
    clean = re.sub(r"[^\w.-]+", "_", text).strip("_")[:60]
    return f"{clean}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def app_feature_dir(model_name: str, sae_id: str, sae_fingerprint: str) -> Path:
    """Feature data computed for an SAE, keyed by its weights: the app's background job and ``scores --layers /
    --release`` save here, the app reads here."""
    return app_features_cache() / slug(model_name) / f"{slug(sae_id)}-{sae_fingerprint}"


def latest_app_feature_dir(model_name: str, sae_id: str) -> Path | None:
    """The most recently written :func:`app_feature_dir` of ``sae_id`` (whatever its weights), or None: for views
    that list many SAEs without loading each one's weights (the Layers overview)."""
    base = app_features_cache() / slug(model_name)
    found = [(p.stat().st_mtime, p.parent) for p in base.glob(f"{glob.escape(slug(sae_id))}-*/meta.json")
             if not p.parent.name.endswith("-subset")]
    return max(found)[1] if found else None
