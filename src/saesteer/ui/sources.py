"""Where the app's model, SAEs and feature data come from, chosen in one place for each run: the real
loaders (:mod:`.loaders`), or the tiny random model and SAEs of :mod:`saesteer.testing` when
``$SAESTEER_TEST_FIXTURE=tiny`` (AppTest, the browser test). The sidebar and the pages only talk to the
:class:`Sources` they are given, so neither knows which one it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import streamlit as st

from ..config import ModelSpec, SaeSpec
from ..models import LoadedModel
from ..paths import fixture_mode
from ..saes import LoadedSae, SaeLoadError
from . import loaders
from .loaders import SaeChoice

if TYPE_CHECKING:
    from ..features import FeatureData


class Sources(Protocol):
    """What the sidebar loads through. The two implementations below differ in what they load, not in how
    the app uses them."""

    notice: str | None
    """Shown at the top of the sidebar on every page (what the numbers are worth), or None."""
    fixed_model: ModelSpec | None
    """The one model this source has (the sidebar then offers no model picker), or None."""
    fixed_saes: bool
    """True when the SAEs are fixed too (the sidebar offers no SAE-source picker, only the layer)."""

    def load_model(self, spec: ModelSpec) -> LoadedModel: ...

    def sae_choices(self, model_name: str, source: str = "bundled", release: str | None = None) -> list[SaeChoice]: ...

    def load_sae(self, spec: SaeSpec, model_spec: ModelSpec, lm: LoadedModel) -> LoadedSae: ...

    def load_feature_data(self, model_name: str, sae: LoadedSae) -> FeatureData | None: ...

    def layer_tables(self, model_name: str, choices: list[SaeChoice], current: LoadedSae | None = None, current_data=None) -> dict[int, object]: ...

    def unsaved_feature_data(self, model_name: str, sae: LoadedSae) -> FeatureData | None: ...


class RealSources:
    """The embedded model, hub and local models; bundled, sae-lens and local SAEs; bundled, cached or computed
    feature data."""

    notice = None
    fixed_model = None
    fixed_saes = False

    # Looked up at each call, so that a test's monkeypatch of a loader reaches the app.
    def load_model(self, spec: ModelSpec) -> LoadedModel:
        return loaders.load_model(spec)

    def sae_choices(self, model_name: str, source: str = "bundled", release: str | None = None) -> list[SaeChoice]:
        return loaders.sae_choices(model_name, source, release)

    def load_sae(self, spec: SaeSpec, model_spec: ModelSpec, lm: LoadedModel) -> LoadedSae:
        return loaders.load_sae(spec, model_spec, lm)

    def load_feature_data(self, model_name: str, sae: LoadedSae) -> FeatureData | None:
        return loaders.load_feature_data(model_name, sae)

    def layer_tables(self, model_name: str, choices: list[SaeChoice], current: LoadedSae | None = None, current_data=None) -> dict[int, object]:
        return loaders.layer_tables(model_name, choices, current, current_data)

    def unsaved_feature_data(self, model_name: str, sae: LoadedSae) -> FeatureData | None:
        return loaders.unsaved_feature_data(model_name, sae)


# ---------------------------------------------------------------------------------------------------
# The test fixture


@st.cache_resource(show_spinner=False)
def tiny_parts() -> dict:
    """The fixture's model, its SAEs by layer, and the words its tokenizer knows (built once per process)."""
    from ..testing import TINY_LAYERS, WORDS, make_tiny_model, make_tiny_sae

    lm = make_tiny_model()
    saes = {layer: make_tiny_sae(layer=layer, seed=layer) for layer in TINY_LAYERS}
    return {"lm": lm, "saes": saes, "words": WORDS}


@st.cache_resource(show_spinner="Computing feature data on the test fixture…", max_entries=8)
def tiny_feature_data(layer: int) -> FeatureData:
    from ..testing import tiny_feature_data as compute

    parts = tiny_parts()
    return compute(parts["lm"], parts["saes"][layer], parts["words"])


class TinySources:
    """One tiny random model with a random TopK SAE at each of a few layers (test fixture; numbers mean nothing)."""

    notice = "Test fixture: a tiny **random** model and random SAEs. The numbers mean nothing."
    fixed_saes = True

    def __init__(self) -> None:
        from ..testing import TINY_MODEL

        self.fixed_model = ModelSpec(name=TINY_MODEL, device="cpu")

    def load_model(self, spec: ModelSpec) -> LoadedModel:
        return tiny_parts()["lm"]

    def sae_choices(self, model_name: str, source: str = "bundled", release: str | None = None) -> list[SaeChoice]:
        from ..testing import TINY_LAYERS

        return [
            SaeChoice(layer=l, label=f"layer {l} · tiny-topk-L{l} (test fixture)", spec=SaeSpec(source="bundled", layer=l, sae_id=f"tiny-topk-L{l}"), ref=f"tiny-topk-L{l}", width=128)
            for l in TINY_LAYERS
        ]

    def load_sae(self, spec: SaeSpec, model_spec: ModelSpec, lm: LoadedModel) -> LoadedSae:
        saes = tiny_parts()["saes"]
        layer = spec.layer if spec.layer is not None else int(str(spec.sae_id).rsplit("L", 1)[-1])
        if layer not in saes:
            raise SaeLoadError(f"no test-fixture SAE at layer {layer}; fixture layers: {', '.join(map(str, sorted(saes)))}")
        return saes[layer]

    def load_feature_data(self, model_name: str, sae: LoadedSae) -> FeatureData:
        return tiny_feature_data(sae.layer)

    def layer_tables(self, model_name: str, choices: list[SaeChoice], current: LoadedSae | None = None, current_data=None) -> dict[int, object]:
        out = {choice.layer: tiny_feature_data(choice.layer).table for choice in choices}
        if current is not None and current_data is not None:
            out[current.layer] = current_data.table
        return dict(sorted(out.items()))

    def unsaved_feature_data(self, model_name: str, sae: LoadedSae) -> None:
        return None


def current() -> Sources:
    """The sources this run uses: the test fixture when ``$SAESTEER_TEST_FIXTURE=tiny``, else the real ones."""
    return _tiny() if fixture_mode() == "tiny" else _REAL


_REAL = RealSources()


@st.cache_resource(show_spinner=False)
def _tiny() -> TinySources:
    return TinySources()
