"""The sidebar's Gemma Scope 2 picker: release → layer → width → L0, filled from sae-lens' own directory.

Nothing here downloads anything: the options come from the ``pretrained_saes.yaml`` sae-lens ships, and
the caption says whether the chosen SAE is already in the local hub cache. The choice is an ordinary
sae-lens release SAE (``RELEASE:SAE_ID`` in the URL), loaded by the sidebar like any other.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from .. import gemmascope
from ..config import SaeSpec
from ..saes import SaeLoadError
from .loaders import SaeChoice

SOURCE = "gemmascope"
LABEL = "Gemma Scope 2"
_PREFERRED_LAYER = 12  # the middle of Gemma 3 270M, the SAE the users know from Neuronpedia
_PREFERRED_WIDTH = "16k"
_PREFERRED_L0 = "medium"
KEYS = {"release": "sb_gs_release", "layer": "sb_gs_layer", "width": "sb_gs_width", "sae": "sb_gs_sae"}

Kept = Callable[..., object]
Getter = Callable[[str], object]
Setter = Callable[[str, object], None]


def sources(model_name: str) -> dict[str, str]:
    """{'gemmascope': 'Gemma Scope 2'} when sae-lens lists Gemma Scope 2 residual SAEs for the model, else {}."""
    return {SOURCE: LABEL} if gemmascope.releases(model_name) else {}


def apply_link(ref: str, set_: Setter) -> bool:
    """Point the picker at ``ref`` ('RELEASE:SAE_ID' of a Gemma Scope 2 SAE); False for any other ref."""
    if ":" not in ref:
        return False
    release, sae_id = ref.split(":", 1)
    if not gemmascope.is_scope_release(release):
        return False
    set_("sb_sae_source", SOURCE)
    set_(KEYS["release"], release)
    try:
        scope = gemmascope.find(release, sae_id)
    except SaeLoadError:  # an unknown id: the picker keeps its defaults and the sidebar reports the refused link
        return True
    for key, value in (("layer", scope.layer), ("width", scope.width_label), ("sae", sae_id)):
        set_(KEYS[key], value)
    return True


def _valid(get: Getter, set_: Setter, key: str, options: list, preferred) -> None:
    """Keep the remembered value of a picker level only while it is among that level's options."""
    if get(key) not in options:
        set_(key, preferred if preferred in options else options[0])


def choose(model_name: str, kept: Kept, get: Getter, set_: Setter, d_model: int | None = None) -> SaeChoice:
    """Render the four pickers and return the chosen SAE."""
    releases = gemmascope.releases(model_name)
    if not releases:
        raise RuntimeError(f"sae-lens' directory lists no Gemma Scope 2 residual-stream SAEs for {model_name}")
    _valid(get, set_, KEYS["release"], releases, releases[0])
    release = kept(st.selectbox, "Gemma Scope 2 release", KEYS["release"], options=releases,
                   help="-res: layers 5, 9, 12, 15 at every width; -res-all: every layer at 16k and 262k")
    entries = gemmascope.catalogue(release)
    layers = gemmascope.layers(entries)
    _valid(get, set_, KEYS["layer"], layers, _PREFERRED_LAYER)
    layer = kept(st.selectbox, "Layer", KEYS["layer"], options=layers, help="the residual stream after this block (blocks.L.hook_resid_post)")
    widths = gemmascope.widths(entries, layer)
    _valid(get, set_, KEYS["width"], widths, _PREFERRED_WIDTH)
    width = kept(st.selectbox, "Width", KEYS["width"], options=widths, format_func=lambda w: f"{w} · {gemmascope.WIDTHS[w]:,} features")
    by_id = {s.sae_id: s for s in gemmascope.sparsities(entries, layer, width)}
    preferred = next((i for i, s in by_id.items() if s.l0_label == _PREFERRED_L0 and not s.variant), None)
    _valid(get, set_, KEYS["sae"], list(by_id), preferred)
    sae_id = kept(st.selectbox, "L0", KEYS["sae"], options=list(by_id), format_func=lambda i: by_id[i].l0_option,
                  help="mean number of active latents per token, as sae-lens' directory gives it")
    scope = by_id[sae_id]
    if gemmascope.is_cached(scope):
        st.caption("In the local Hugging Face cache: loads offline.")
    else:
        size = f" (≈ {scope.weights_bytes(d_model) / 1e6:,.0f} MB)" if d_model else ""
        st.caption(f"Not cached yet: the first load downloads it from the hub{size}; after that it loads offline.")
    return SaeChoice(layer=scope.layer, label=f"layer {scope.layer} · {scope.sae_id}",
                     spec=SaeSpec(source="release", release=release, sae_id=sae_id), ref=scope.ref, width=scope.width)
