"""Gemma Scope 2: Google DeepMind's JumpReLU SAEs of Gemma 3, the ones Neuronpedia shows, for the embedded model.

The catalogue comes from sae-lens' packaged ``pretrained_saes.yaml`` (no download): each release lists SAE ids
such as ``layer_12_width_16k_l0_medium`` with the yaml's L0 and, for some, a Neuronpedia id. Loading goes
through sae-lens' own ``gemma_3`` conversion (``SAE.from_pretrained``), so the weights land in the Hugging
Face hub cache and are read from there afterwards.

One call of that conversion does not go through the hub cache: ``get_safetensors_tensor_shapes`` reads the
header of ``params.safetensors`` with two HTTP range requests (``requests.get`` on ``hf_hub_url(...)``) on
every load, even when the file is cached and even with ``HF_HUB_OFFLINE=1``. :func:`load` serves exactly that
call from the cached file's own header when the file is in the cache, so an SAE needs the hub once and then
loads offline; everything else is sae-lens' code unchanged.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import EMBEDDED_MODEL
from .saes import SaeLoadError

#: The Hugging Face model the embedded model is a quantised copy of (what the Gemma Scope 2 yaml entries name).
EMBEDDED_HF_MODEL = "google/gemma-3-270m"
#: sae-lens' conversion function of every Gemma Scope 2 release.
CONVERSION = "gemma_3"
#: Width labels in Gemma Scope 2 ids and the dictionary sizes they stand for.
WIDTHS = {"16k": 16_384, "65k": 65_536, "262k": 262_144, "1m": 1_048_576}
L0_ORDER = ("small", "medium", "big")
_ID = re.compile(r"^layer_(\d+)_width_(\d+[km])_l0_([a-z]+)(?:_(seed_\d+))?$")
#: Folders of residual-stream SAEs (what saesteer reads: ``blocks.L.hook_resid_post``).
_RESIDUAL = ("resid_post/", "resid_post_all/")


class HubUnavailable(SaeLoadError):
    """A hub SAE is not in the local cache and the hub cannot be reached."""


@dataclass(frozen=True)
class ScopeSae:
    """One Gemma Scope 2 SAE as sae-lens' directory lists it."""

    release: str
    """sae-lens release, e.g. 'gemma-scope-2-270m-pt-res'."""
    sae_id: str
    """Id within the release, e.g. 'layer_12_width_16k_l0_medium'."""
    layer: int
    """Residual stream after this block (``blocks.L.hook_resid_post``)."""
    width_label: str
    """'16k', '65k', '262k' or '1m', as in the id."""
    l0_label: str
    """'small', 'medium' or 'big': the sparsity target named in the id."""
    variant: str | None
    """A second training seed ('seed_1') where the release has one, else None."""
    l0: float | None
    """The yaml's L0 (mean active latents per token) for this SAE, None where it gives none."""
    neuronpedia_id: str | None
    """Neuronpedia's id of this SAE (e.g. 'gemma-3-270m/12-gemmascope-2-res-16k'), None where it has none."""
    repo_id: str
    """Hugging Face repository of the weights."""
    path: str
    """Folder of the SAE inside the repository."""

    @property
    def width(self) -> int:
        return WIDTHS[self.width_label]

    @property
    def ref(self) -> str:
        """The ``sae`` query parameter that names this SAE (``RELEASE:SAE_ID``)."""
        return f"{self.release}:{self.sae_id}"

    @property
    def l0_option(self) -> str:
        """What the L0 picker shows: the id's sparsity name and the yaml's L0."""
        seed = f" ({self.variant.replace('_', ' ')})" if self.variant else ""
        value = f"L0 {self.l0:g}" if self.l0 else "L0 not given"
        return f"{self.l0_label}{seed} · {value}"

    def weights_bytes(self, d_model: int) -> int:
        """Size of ``params.safetensors`` in float32: encoder and decoder, biases and thresholds."""
        return 4 * (2 * d_model * self.width + 2 * self.width + d_model)


def _directory() -> dict:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def hf_model_of(model_name: str) -> str:
    """The Hugging Face id whose Gemma Scope 2 SAEs fit ``model_name`` (the embedded model is Gemma 3 270M)."""
    return EMBEDDED_HF_MODEL if model_name == EMBEDDED_MODEL else model_name


def _residual_scope(entry) -> bool:
    return entry.conversion_func == CONVERSION and bool(entry.saes_map) and all(p.startswith(_RESIDUAL) for p in entry.saes_map.values())


def releases(model_name: str = EMBEDDED_MODEL) -> list[str]:
    """Gemma Scope 2 releases of residual-stream SAEs for ``model_name``, from sae-lens' directory (no network)."""
    hf_model = hf_model_of(model_name)
    return sorted(name for name, entry in _directory().items() if entry.model == hf_model and _residual_scope(entry))


def is_scope_release(release: str) -> bool:
    """Whether ``release`` is a Gemma Scope 2 release of residual-stream SAEs (loaded by sae-lens' gemma_3 conversion)."""
    entry = _directory().get(release)
    return entry is not None and _residual_scope(entry)


def catalogue(release: str) -> list[ScopeSae]:
    """Every SAE of a Gemma Scope 2 residual-stream release, by layer, width, L0; ids of another shape are left out."""
    directory = _directory()
    if release not in directory or not _residual_scope(directory[release]):
        known = ", ".join(releases()) or "none"
        raise SaeLoadError(f"{release!r} is not a Gemma Scope 2 release in sae-lens' directory; for {EMBEDDED_MODEL}: {known}")
    entry = directory[release]
    out = []
    for sae_id, path in entry.saes_map.items():
        m = _ID.match(sae_id)
        if m is None or m.group(2) not in WIDTHS:
            continue
        out.append(ScopeSae(
            release=release, sae_id=sae_id, layer=int(m.group(1)), width_label=m.group(2), l0_label=m.group(3),
            variant=m.group(4), l0=entry.expected_l0.get(sae_id) or None, neuronpedia_id=entry.neuronpedia_id.get(sae_id),
            repo_id=entry.repo_id, path=path,
        ))
    return sorted(out, key=_order)


def _order(s: ScopeSae) -> tuple:
    l0 = L0_ORDER.index(s.l0_label) if s.l0_label in L0_ORDER else len(L0_ORDER)
    return s.layer, s.width, l0, s.variant or ""


def find(release: str, sae_id: str) -> ScopeSae:
    """The catalogue entry of ``release``/``sae_id``; an unknown id is refused with examples of real ones."""
    entries = catalogue(release)
    for s in entries:
        if s.sae_id == sae_id:
            return s
    m = re.match(r"layer_(\d+)_", sae_id)
    near = [s for s in entries if m and s.layer == int(m.group(1))] or [s for s in entries if s.l0_label == "medium"] or entries
    examples = ", ".join(s.sae_id for s in near[:6])
    raise SaeLoadError(f"release {release!r} has no SAE {sae_id!r}; its layers are {', '.join(map(str, layers(entries)))}, "
                       f"and ids look like layer_L_width_W_l0_S, e.g. {examples}")


def layers(entries: list[ScopeSae]) -> list[int]:
    return sorted({s.layer for s in entries})


def widths(entries: list[ScopeSae], layer: int) -> list[str]:
    return sorted({s.width_label for s in entries if s.layer == layer}, key=WIDTHS.__getitem__)


def sparsities(entries: list[ScopeSae], layer: int, width: str) -> list[ScopeSae]:
    """The SAEs at ``layer`` and ``width``, one per L0 (and seed), smallest L0 first."""
    return [s for s in entries if s.layer == layer and s.width_label == width]


# ---------------------------------------------------------------------------------------------------
# The hub cache


def hub_offline() -> bool:
    import huggingface_hub.constants as hub

    return bool(hub.is_offline_mode())


def hub_cache_dir() -> Path:
    import huggingface_hub.constants as hub

    return Path(hub.HF_HUB_CACHE)


def cached_params(repo_id: str, path: str) -> Path | None:
    """The locally cached ``params.safetensors`` of the SAE in ``repo_id``/``path``, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, f"{path}/params.safetensors", cache_dir=hub_cache_dir())
    return Path(found) if isinstance(found, str) else None


def is_cached(scope: ScopeSae) -> bool:
    return cached_params(scope.repo_id, scope.path) is not None


def offline_message(scope: ScopeSae, d_model: int | None = None, cause: str = "") -> str:
    size = f", about {scope.weights_bytes(d_model) / 1e6:,.0f} MB" if d_model else ""
    why = f" ({cause})" if cause else ""
    return (
        f"Gemma Scope 2 SAE {scope.release} / {scope.sae_id} is not in the local Hugging Face cache ({hub_cache_dir()}) "
        f"and the hub cannot be reached{why}. It needs the hub once (the file {scope.repo_id}/{scope.path}/params.safetensors"
        f"{size}) and is then cached, so later starts load it offline. Until then the bundled SAEs work without network."
    )


_SHAPES_LOCK = threading.Lock()


def _header_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


@contextmanager
def _shapes_from_cache(repo_id: str, filename: str, local: Path) -> Iterator[None]:
    """While sae-lens' gemma_3 conversion runs, answer its header request for ``repo_id``/``filename`` from the
    cached file (the only hub call of that path that the cache cannot serve); any other file goes to sae-lens'
    own function. Loads are serialised so that the module attribute is restored exactly."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    with _SHAPES_LOCK:
        original = loaders.get_safetensors_tensor_shapes

        def shapes(repo: str, name: str) -> dict[str, list[int]]:
            if repo == repo_id and name == filename:
                return _header_shapes(local)
            return original(repo, name)

        loaders.get_safetensors_tensor_shapes = shapes
        try:
            yield
        finally:
            loaders.get_safetensors_tensor_shapes = original


def load(release: str, sae_id: str, device: str = "cpu", dtype: str = "float32", d_model: int | None = None):
    """A Gemma Scope 2 SAE through sae-lens' ``gemma_3`` conversion: from the hub cache when it is there (no
    network), else downloaded once. Offline and not cached: :class:`HubUnavailable`, without a network call."""
    from sae_lens import SAE

    scope = find(release, sae_id)
    local = cached_params(scope.repo_id, scope.path)
    if local is not None:
        with _shapes_from_cache(scope.repo_id, f"{scope.path}/params.safetensors", local):
            return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    if hub_offline():
        # sae-lens would still send its header request through `requests`, which ignores HF_HUB_OFFLINE.
        raise HubUnavailable(offline_message(scope, d_model, "HF_HUB_OFFLINE is set"))
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except OSError as exc:  # requests' errors and huggingface_hub's cache misses are OSErrors
        raise HubUnavailable(offline_message(scope, d_model, f"{exc.__class__.__name__}: {str(exc)[:200]}")) from exc
