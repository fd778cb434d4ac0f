"""Load SAEs through sae-lens: a release + id (hub), a local sae-lens directory, or the bundled ones.

The bundled SAEs live under ``assets/saes/<model>/`` with a ``manifest.json`` (written by ``bundle.py``)
that records, per SAE, its id, layer, width, hook, directory and quality metrics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EMBEDDED_MODEL, SaeSpec
from .hookpoints import HookPointError, hook_layer
from .models import LoadedModel, forbid_pickle_loads
from .paths import bundled_sae_dir



class SaeLoadError(RuntimeError):
    """An SAE could not be loaded or does not fit the model; the message says why and what is allowed."""


@dataclass
class LoadedSae:
    """An sae-lens SAE plus where it reads the residual stream."""

    sae: object  # sae_lens.SAE
    id: str
    hook_name: str
    layer: int
    path: str | None = None

    @property
    def width(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @torch.no_grad()
    def directions(self, features: torch.Tensor | list[int], scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``decode(c·e_f) − decode(0)`` per feature: the residual-stream direction the SAE adds for f.

        Equals ``c · W_dec[f]`` for a plain affine decoder, and stays right for SAEs whose decode applies
        run-time output normalisation. Returns (n_features, d_model) in the SAE's dtype.
        """
        sae = self.sae
        idx = torch.as_tensor(features, dtype=torch.long, device=sae.W_dec.device)
        acts = torch.zeros(len(idx), self.width, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
        acts[torch.arange(len(idx)), idx] = torch.as_tensor(scale, dtype=sae.W_dec.dtype, device=sae.W_dec.device).expand(len(idx))
        zero = sae.decode(torch.zeros(1, self.width, dtype=sae.W_dec.dtype, device=sae.W_dec.device))
        return sae.decode(acts) - zero

    def check_feature(self, feature: int) -> None:
        check_feature_id(feature, self.width, self.id)

    def latent_max(self, x: torch.Tensor) -> torch.Tensor:
        """``max_j a_j(x)`` over all of the SAE's latents (the paper's strength unit); x: (..., d_model)."""
        return self.sae.encode(x).max()


def check_feature_id(feature: int, width: int, sae_id: str) -> None:
    """Refuse anything but an integer feature id in 0..width-1, naming the SAE and the allowed range."""
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < width:
        raise SaeLoadError(f"feature {feature!r} is out of range for SAE '{sae_id}': use an integer from 0 to {width - 1}")


def read_manifest(model_name: str = EMBEDDED_MODEL) -> dict:
    path = bundled_sae_dir(model_name) / "manifest.json"
    if not path.exists():
        return {"saes": []}
    return json.loads(path.read_text())


def list_bundled(model_name: str = EMBEDDED_MODEL) -> list[dict]:
    """Bundled SAEs: dicts with id, layer, width, hook, path (absolute), metrics; sorted by layer."""
    root = bundled_sae_dir(model_name)
    out = []
    for entry in read_manifest(model_name).get("saes", []):
        path = root / entry["dir"]
        if (path / "cfg.json").exists():
            out.append({**entry, "path": str(path)})
    return sorted(out, key=lambda e: e["layer"])


def _hook_name_of(sae) -> str:
    meta = getattr(sae.cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) if meta is not None else None
    if not name:
        raise SaeLoadError("the SAE config names no hook point (cfg.metadata.hook_name)")
    return name


def _from_disk(path: Path, device: str, dtype: str) -> object:
    from sae_lens import SAE

    if not (path / "cfg.json").exists():
        raise SaeLoadError(f"{path} is not an sae-lens SAE directory: it needs cfg.json and sae_weights.safetensors")
    try:
        return SAE.load_from_disk(str(path), device=device, dtype=dtype)
    except Exception as exc:  # sae-lens raises many kinds; the user needs the path and the cause
        raise SaeLoadError(f"could not load the SAE in {path}: {exc.__class__.__name__}: {exc}") from exc


def check_release(release: str, sae_id: str) -> None:
    """Refuse a release or SAE id that sae-lens' packaged directory does not list (no network needed)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = [r for r in directory if release.split("-")[0] in r][:8]
        raise SaeLoadError(f"unknown sae-lens release {release!r}; some known ones: {', '.join(close) or ', '.join(list(directory)[:8])}")
    ids = directory[release].saes_map
    if sae_id not in ids:
        raise SaeLoadError(f"release {release!r} has no SAE {sae_id!r}; it has e.g. {', '.join(list(ids)[:6])}")


def _from_release(release: str, sae_id: str, device: str, dtype: str, d_model: int | None = None) -> object:
    from sae_lens import SAE

    from . import gemmascope

    check_release(release, sae_id)
    if gemmascope.is_scope_release(release):
        return gemmascope.load(release, sae_id, device, dtype, d_model)
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except (OSError, ConnectionError) as exc:
        raise SaeLoadError(
            f"could not download SAE {release}/{sae_id}: the Hugging Face hub is unreachable ({exc.__class__.__name__}). "
            "Offline, use the bundled SAEs or a local sae-lens directory."
        ) from exc


def bundled_entry(spec: SaeSpec, model_name: str = EMBEDDED_MODEL) -> dict:
    """The manifest entry of the bundled SAE ``spec`` names (by id, else by layer)."""
    entries = list_bundled(model_name)
    match = [e for e in entries if (spec.sae_id and e["id"] == spec.sae_id) or (spec.sae_id is None and e["layer"] == spec.layer)]
    if not match:
        have = ", ".join(str(e["layer"]) for e in entries) or "none"
        what = f"with id {spec.sae_id!r}" if spec.sae_id else f"at layer {spec.layer}"
        raise SaeLoadError(f"no bundled SAE for {model_name} {what}; bundled layers: {have}")
    return match[0]


def precheck(spec: SaeSpec, model_name: str = EMBEDDED_MODEL) -> tuple[str, int | None]:
    """The checks that need neither the model nor the SAE's weights, so that a wrong SAE fails before a model
    loads for minutes: the bundled SAE exists, the directory holds cfg.json, the release lists the id.
    Returns the SAE's id as :func:`load_sae` names it and its width where the manifest or cfg.json says it."""
    if spec.source == "bundled":
        entry = bundled_entry(spec, model_name)
        return entry["id"], entry.get("width")
    if spec.source == "local":
        path = Path(spec.path).expanduser()
        if not (path / "cfg.json").exists():
            raise SaeLoadError(f"{path} is not an sae-lens SAE directory: it needs cfg.json and sae_weights.safetensors")
        try:
            width = json.loads((path / "cfg.json").read_text()).get("d_sae")
        except (OSError, ValueError, AttributeError):
            width = None  # load_sae reports a broken cfg.json with sae-lens' own message
        return path.name, width if isinstance(width, int) and not isinstance(width, bool) else None
    check_release(spec.release, spec.sae_id)
    return f"{spec.release}/{spec.sae_id}", None


def load_sae(spec: SaeSpec, lm: LoadedModel | None = None, model_name: str = EMBEDDED_MODEL) -> LoadedSae:
    """Load the SAE ``spec`` names; with ``lm``, check it fits the model (width and layer) and match its device."""
    device = str(lm.device) if lm is not None else "cpu"
    dtype = "float32"
    forbid_pickle_loads()
    if spec.source == "bundled":
        entry = bundled_entry(spec, model_name)
        sae = _from_disk(Path(entry["path"]), device, dtype)
        sae_id, path = entry["id"], entry["path"]
    elif spec.source == "local":
        path = str(Path(spec.path).expanduser())
        sae = _from_disk(Path(path), device, dtype)
        sae_id = Path(path).name
    else:
        sae = _from_release(spec.release, spec.sae_id, device, dtype, lm.d_model if lm is not None else None)
        sae_id, path = f"{spec.release}/{spec.sae_id}", None
    hook = _hook_name_of(sae)
    try:
        layer = hook_layer(hook)
    except HookPointError as exc:
        raise SaeLoadError(str(exc)) from exc
    loaded = LoadedSae(sae=sae, id=sae_id, hook_name=hook, layer=layer, path=path)
    if lm is not None:
        check_fits(loaded, lm)
    return loaded


def check_fits(loaded: LoadedSae, lm: LoadedModel) -> None:
    if loaded.d_in != lm.d_model:
        raise SaeLoadError(
            f"SAE '{loaded.id}' reads vectors of size d_in={loaded.d_in}, but model '{lm.name}' has width {lm.d_model}: "
            "pick an SAE trained on this model"
        )
    if not 0 <= loaded.layer < lm.n_layers:
        raise SaeLoadError(f"SAE '{loaded.id}' hooks layer {loaded.layer}, but the model has layers 0..{lm.n_layers - 1}")


def select(model_name: str = EMBEDDED_MODEL, layers: Sequence[int] | None = None, release: str | None = None,
           pattern: str | None = None) -> list[SaeSpec]:
    """The SAEs a many-SAE job covers, in layer order: bundled SAEs at ``layers``, or the SAEs of a sae-lens
    ``release`` whose ids match the shell ``pattern`` and/or whose layer is in ``layers``. Needs no network
    (sae-lens' packaged directory). Refuses a selection that is empty or names layers with no SAE."""
    import fnmatch
    import re

    if release is None:
        if pattern is not None:
            raise SaeLoadError("--ids PATTERN selects SAEs of a release: give --release too (e.g. --release gemma-scope-2-270m-pt-res-all)")
        if not layers:
            raise SaeLoadError("give --layers (bundled SAEs) or --release R with --ids PATTERN and/or --layers")
        entries = list_bundled(model_name)
        have = sorted({int(e["layer"]) for e in entries})
        missing = [layer for layer in layers if layer not in have]
        if missing:
            raise SaeLoadError(f"no bundled SAE for {model_name} at layer(s) {', '.join(map(str, missing))}; bundled layers: "
                               f"{', '.join(map(str, have)) or 'none'} (other layers: --release with a sae-lens release)")
        chosen = sorted((e for e in entries if int(e["layer"]) in set(layers)), key=lambda e: (int(e["layer"]), e["id"]))
        return [SaeSpec(source="bundled", sae_id=e["id"], layer=int(e["layer"])) for e in chosen]
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = [r for r in directory if release.split("-")[0] in r][:8]
        raise SaeLoadError(f"unknown sae-lens release {release!r}; some known ones: {', '.join(close) or ', '.join(list(directory)[:8])}")
    ids = list(directory[release].saes_map)

    def layer_of(sae_id: str) -> int | None:
        m = re.search(r"(?:^|[_./-])(?:layer|blocks?|l)[_.]?(\d+)", sae_id)
        return int(m.group(1)) if m else None

    chosen = [i for i in ids if pattern is None or fnmatch.fnmatchcase(i, pattern)]
    if layers:
        chosen = [i for i in chosen if layer_of(i) in set(layers)]
    if not chosen:
        what = " and ".join(x for x in (f"ids matching {pattern!r}" if pattern else "", f"layers {list(layers)}" if layers else "") if x)
        raise SaeLoadError(f"release {release!r} has no SAE with {what or 'any id'}; its ids look like {', '.join(ids[:4])}")
    chosen.sort(key=lambda i: (layer_of(i) if layer_of(i) is not None else 10**9, i))
    return [SaeSpec(source="release", release=release, sae_id=i) for i in chosen]
