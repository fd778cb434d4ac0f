"""The shared sidebar (model, SAE source, layer) and its mirror in the URL.

Sidebar values and the selections that outlive a page (feature, prompt, strength, mode; see ``session.py``)
live in plain session-state keys, so they survive page switches, and are mirrored in the URL's query
parameters so that a link reproduces the view. What the sidebar loads comes through ``ctx.sources``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ..config import EMBEDDED_MODEL, ConfigError, ModelSpec, SaeSpec
from ..models import LoadedModel
from ..paths import allowed_roots, cache_root
from ..subsets import subset_label
from . import diagnostics_panel, loaders, sae_picker
from .context import AppContext
from .loaders import SaeChoice
from .nav import sidebar_links
from .session import CONCEPT, FEATURE, MODE, PRESENT, PROMPT, SEED, STRENGTH
from .sources import Sources
from .state import check_path, looks_like_path, parse_query_params

_QP_DONE = "_saesteer_qp_applied"
_QP_PROBLEMS = "_saesteer_qp_problems"
MODEL_KINDS = {"embedded": f"{EMBEDDED_MODEL} (embedded, offline)", "hub": "Hugging Face hub id", "local": "local directory"}
SAE_SOURCES = {"bundled": "bundled", "release": "sae-lens release", "local": "local directory"}
DEFAULT_RELEASE = "gemma-scope-2b-pt-res-canonical"


# ---------------------------------------------------------------------------------------------------
# Sidebar widget values that survive page switches. Each page renders the sidebar itself and Streamlit
# folds the page into a widget's id, so each sidebar widget keeps its value in a shadow key: restored
# before the widget is built, updated by its on_change callback (which runs before the script) and after
# it returns.

_SHADOW = "_keep_"


def _get(key: str):
    return st.session_state.get(_SHADOW + key)


def _set(key: str, value) -> None:
    st.session_state[_SHADOW + key] = value


def _remember(key: str) -> None:
    _set(key, st.session_state[key])


def _kept(widget, label: str, key: str, **kwargs):
    if _get(key) is not None:
        st.session_state[key] = _get(key)
    value = widget(label, key=key, on_change=_remember, args=(key,), **kwargs)
    _set(key, value)
    return value


# ---------------------------------------------------------------------------------------------------
# Query parameters -> initial widget state (once per session)


def _apply_query_params(sources: Sources) -> None:
    if st.session_state.get(_QP_DONE):
        return
    st.session_state[_QP_DONE] = True
    params = st.query_params.to_dict()
    if sources.fixed_model is not None:
        params.pop("model", None)  # one model, not nameable from outside
    parsed = parse_query_params(params, allowed_roots())
    st.session_state[_QP_PROBLEMS] = parsed.problems
    view = parsed.state
    if view.model is not None:
        if view.model == EMBEDDED_MODEL:
            _set("sb_model_kind", "embedded")
        else:
            _set("sb_model_kind", "local" if Path(view.model).expanduser().exists() else "hub")
            _set("sb_model_name", view.model)
    if view.sae is not None:
        if Path(view.sae).expanduser().is_dir():
            _set("sb_sae_source", "local")
            _set("sb_sae_path", view.sae)
        elif sae_picker.apply_link(view.sae, _set):
            pass  # a Gemma Scope 2 SAE: its picker now names it
        elif ":" in view.sae:
            release, _ = view.sae.split(":", 1)
            _set("sb_sae_source", "release")
            _set("sb_release", release)
            _set("sb_sae_ref", view.sae)
        else:
            _set("sb_sae_source", "bundled")
            _set("sb_sae_ref", view.sae)
    if view.sae is not None and not Path(view.sae).expanduser().is_dir():
        st.session_state["_sb_want_ref"] = view.sae
    if view.layer is not None:
        st.session_state["_sb_want_layer"] = view.layer
    for key, value in ((FEATURE, view.feature), (PROMPT, view.prompt), (STRENGTH, view.strength), (MODE, view.mode),
                       (CONCEPT, view.concept), (SEED, view.seed), (PRESENT, view.present)):
        if value is not None:
            st.session_state[key] = value


def sync_query_params(ctx: AppContext) -> None:
    """Mirror the current selection into the URL (called after the sidebar and again after the page)."""
    wanted = ctx.view.to_params()
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


# ---------------------------------------------------------------------------------------------------
# The sidebar


def _model_picker(sources: Sources) -> ModelSpec:
    if sources.fixed_model is not None:
        return sources.fixed_model
    kind = _kept(st.radio, "Model", "sb_model_kind", options=list(MODEL_KINDS), format_func=MODEL_KINDS.get)
    name = EMBEDDED_MODEL
    if kind == "hub":
        name = _kept(st.text_input, "Hub id", "sb_model_name", placeholder="google/gemma-2-2b").strip()
    elif kind == "local":
        name = _kept(st.text_input, "Model directory", "sb_model_name", placeholder="/path/to/hf-model").strip()
    if name and name != EMBEDDED_MODEL and (kind == "local" or looks_like_path(name) or Path(name).expanduser().exists()):
        _confine(name, "model")  # a "hub id" that names an existing path would be loaded from disk
    with st.expander("Device and precision"):
        device = _kept(st.selectbox, "Device", "sb_device", options=["auto", "cpu", "cuda"], help="auto: CUDA when present, else CPU")
        dtype = _kept(st.selectbox, "Weights", "sb_dtype", options=["float32", "bfloat16", "float16"], help="float32 is exact and fastest for batched CPU work")
    if not name:
        raise ConfigError("type a hub id (e.g. google/gemma-2-2b) or a local model directory")
    return ModelSpec(name=name, device=device, dtype=dtype)


def _confine(path: str, what: str) -> None:
    """Refuse a path typed into the sidebar outside the allowed folders (the server's files are not the user's)."""
    problem = check_path(path, allowed_roots(), what)
    if problem:
        raise ConfigError(problem)


def _sae_choices(ctx: AppContext) -> list[SaeChoice]:
    if ctx.sources.fixed_saes:
        return ctx.sources.sae_choices(ctx.model_name)
    sources = {"bundled": SAE_SOURCES["bundled"], **sae_picker.sources(ctx.model_name), **SAE_SOURCES}
    if _get("sb_sae_source") not in sources:
        _set("sb_sae_source", "bundled")
    source = _kept(st.radio, "SAE source", "sb_sae_source", options=list(sources), format_func=sources.get, horizontal=True)
    if source == sae_picker.SOURCE:
        return [sae_picker.choose(ctx.model_name, _kept, _get, _set, ctx.lm.d_model)]
    if source == "bundled":
        choices = ctx.sources.sae_choices(ctx.model_name, "bundled")
        if not choices:
            raise RuntimeError(
                f"no bundled SAEs for {ctx.model_name}: bundled SAEs exist only for the embedded {EMBEDDED_MODEL} "
                "(and only once they are installed under assets/saes/); pick a sae-lens release or a local directory"
            )
        return choices
    if source == "release":
        if _get("sb_release") is None:
            _set("sb_release", DEFAULT_RELEASE)
        release = _kept(st.text_input, "sae-lens release", "sb_release").strip()
        if loaders.release_ids(release) is None:
            raise RuntimeError(f"unknown sae-lens release {release!r}: use a name from sae-lens' pretrained_saes.yaml, e.g. {DEFAULT_RELEASE}")
        return ctx.sources.sae_choices(ctx.model_name, "release", release)
    path = _kept(st.text_input, "SAE directory (sae-lens format)", "sb_sae_path").strip()
    if not path:
        raise RuntimeError("type the directory of an SAE in sae-lens format (cfg.json + sae_weights.safetensors)")
    _confine(path, "SAE")
    return [SaeChoice(layer=-1, label=path, spec=SaeSpec(source="local", path=path), ref=path)]


def _layer_picker(choices: list[SaeChoice]) -> SaeChoice:
    refs = [c.ref for c in choices]
    by_ref = {c.ref: c for c in choices}
    want_ref = st.session_state.pop("_sb_want_ref", None)
    if want_ref is not None and want_ref not in by_ref:
        st.session_state.setdefault(_QP_PROBLEMS, []).append(
            f"link parameter 'sae' ignored: {want_ref[:120]!r} is not among the SAEs offered here; e.g. {', '.join(refs[:3])}"
        )
    want = st.session_state.pop("_sb_want_layer", None)
    if want is not None and _get("sb_sae_ref") not in by_ref:
        match = [c.ref for c in choices if c.layer == want]
        if match:
            _set("sb_sae_ref", match[0])
        else:
            have = ", ".join(sorted({str(c.layer) for c in choices})) or "none"
            st.session_state.setdefault(_QP_PROBLEMS, []).append(f"link parameter 'layer' ignored: no SAE at layer {want}; layers with an SAE: {have}")
    if _get("sb_sae_ref") not in by_ref:  # start where the demo presets are (else the first SAE)
        _set("sb_sae_ref", next((c.ref for c in choices if c.opens), refs[0]))
    if len(refs) == 1:  # one SAE (a Gemma Scope 2 pick, a local directory): nothing to choose here
        return by_ref[refs[0]]
    ref = _kept(st.selectbox, "Layer", "sb_sae_ref", options=refs, format_func=lambda r: by_ref[r].label, help="the SAEs available for this model and source")
    return by_ref[ref]


def _quality(metrics: dict | None) -> str:
    """Held-out quality of a bundled SAE, in one line."""
    if not metrics:
        return ""
    parts = []
    if "fve" in metrics:
        parts.append(f"variance explained {metrics['fve']:.1%}")
    if "ce_loss_recovered" in metrics:
        parts.append(f"CE loss recovered {metrics['ce_loss_recovered']:.1%}")
    if "dead_fraction" in metrics:
        parts.append(f"dead {metrics['dead_fraction']:.1%}")
    return " · held out: " + ", ".join(parts) if parts else ""


def _describe_model(lm: LoadedModel) -> None:
    info = lm.describe()
    params = info["n_params"]
    size = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M" if params >= 1e6 else f"{params / 1e3:.0f} k"
    st.caption(f"**{info['name']}** · {size} parameters · {info['n_layers']} layers · d_model {info['d_model']} · vocab {info['vocab_size']:,} · **{info['device']}** · {info['dtype']}")


def render_sidebar() -> AppContext:
    """Render the sidebar, load what it selects (errors shown, never raised) and return the context."""
    ctx = AppContext()
    _apply_query_params(ctx.sources)
    with st.sidebar:
        sidebar_links()
        st.markdown("### saesteer")
        if ctx.sources.notice:
            st.warning(ctx.sources.notice, icon=":material/science:")
        try:
            ctx.model_spec = _model_picker(ctx.sources)
            ctx.lm = ctx.sources.load_model(ctx.model_spec)
            _describe_model(ctx.lm)
        except Exception as exc:  # unreachable hub, bad directory, CUDA missing...: say so, keep the app up
            ctx.errors.append(f"Model: {exc}")
            st.error(f"Could not load the model: {exc}")
        if ctx.lm is not None:
            try:
                ctx.choices = _sae_choices(ctx)
                ctx.choice = _layer_picker(ctx.choices)
                ctx.sae = ctx.sources.load_sae(ctx.choice.spec, ctx.model_spec, ctx.lm)
                st.caption(f"SAE **{ctx.sae.id}** · layer {ctx.sae.layer} · {ctx.sae.width:,} features · `{ctx.sae.hook_name}`" + _quality(ctx.choice.metrics))
                diagnostics_panel.sidebar(ctx)
            except Exception as exc:  # unknown release, d_in mismatch, no SAE at the layer...
                ctx.errors.append(f"SAE: {exc}")
                st.error(f"Could not load the SAE: {exc}")
        if ctx.sae is not None:
            try:
                ctx.data = ctx.sources.load_feature_data(ctx.model_name, ctx.sae)
                if ctx.data is None:
                    st.caption("Feature scores: not computed yet (see the Layers page).")
                elif subset_label(ctx.data.meta):
                    st.caption(f"Feature scores: {subset_label(ctx.data.meta)} (a subset; a feature's card offers to add it).")
                elif ctx.sources.unsaved_feature_data(ctx.model_name, ctx.sae) is ctx.data:
                    st.warning(f"Feature scores kept in memory only: the cache folder {cache_root()} is not writable, "
                               "so they are lost when the app restarts.")
            except Exception as exc:  # a corrupt or incompatible data directory
                ctx.errors.append(f"Feature data: {exc}")
                st.error(f"Could not load the feature data: {exc}")
        for problem in st.session_state.get(_QP_PROBLEMS, []):
            st.warning(problem)
    sync_query_params(ctx)
    return ctx
