"""The per-run context every page works from: what the sidebar selected and loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import streamlit as st

from ..config import EMBEDDED_MODEL, ModelSpec
from ..models import LoadedModel
from ..saes import LoadedSae
from .loaders import SaeChoice
from .session import CONCEPT, FEATURE, MODE, PRESENT, PROMPT, SEED, STRENGTH
from .sources import Sources
from .sources import current as current_sources
from .state import ViewState

if TYPE_CHECKING:
    from ..features import FeatureData


@dataclass
class AppContext:
    """What the sidebar selected and loaded in this run. Missing pieces are None, with the reason in ``errors``."""

    model_spec: ModelSpec | None = None
    lm: LoadedModel | None = None
    choices: list[SaeChoice] = field(default_factory=list)
    choice: SaeChoice | None = None
    sae: LoadedSae | None = None
    data: FeatureData | None = None
    errors: list[str] = field(default_factory=list)
    sources: Sources = field(default_factory=current_sources)
    """Where the model, SAEs and feature data come from (the real loaders or the test fixture)."""

    @property
    def model_name(self) -> str:
        return self.model_spec.name if self.model_spec else EMBEDDED_MODEL

    @property
    def feature(self) -> int | None:
        return st.session_state.get(FEATURE)

    @property
    def view(self) -> ViewState:
        return ViewState(
            model=self.model_spec.name if self.model_spec else None,
            sae=self.choice.ref if self.choice else None,
            layer=self.choice.layer if self.choice and self.choice.layer >= 0 else None,
            feature=st.session_state.get(FEATURE),
            prompt=st.session_state.get(PROMPT),
            strength=st.session_state.get(STRENGTH),
            mode=st.session_state.get(MODE),
            concept=st.session_state.get(CONCEPT),
            seed=st.session_state.get(SEED),
            present=st.session_state.get(PRESENT) or None,
        )
