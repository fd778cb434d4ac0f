"""Shared fixtures: a tiny random Gemma-3 model with a word-level tokenizer, and tiny random SAEs.

Nothing here downloads anything; the tiny model is built from a config in milliseconds.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from saesteer.models import LoadedModel
from saesteer.saes import LoadedSae

WORDS = (
    "the a of and to in is was it for on with as by at from this that be are or his her they we you "
    "apple france paris river music dog cat tree water fire king queen city house love war time day "
    "night sun moon star food wine bread ship sea mountain book school law money gold red blue green "
    "experience my from findings show once heard think about , . ! ? : ; - good bad new old big small "
    "i he she one two three first last very more most all some many can will would said made"
).split()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return tok



def make_tiny_model(n_layers: int = 4, d_model: int = 64, seed: int = 0, softcap: float | None = None) -> LoadedModel:
    from tokenizers import processors
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = make_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=64,
        final_logit_softcapping=softcap,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so that final_norm matters in tests
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, name="tiny-gemma3", device=torch.device("cpu"), dtype=torch.float32)


def make_tiny_sae(d_in: int = 64, d_sae: int = 128, layer: int = 2, arch: str = "topk", seed: int = 0, k: int = 8) -> LoadedSae:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name="tiny-gemma3")
    torch.manual_seed(seed)
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
        sae.b_enc.abs_()  # some features fire on most inputs
        if arch == "jumprelu":
            sae.threshold.abs_()  # a positive threshold per latent, as trained JumpReLU SAEs have
    return LoadedSae(sae=sae, id=f"tiny-{arch}-L{layer}", hook_name=meta.hook_name, layer=layer)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_sae() -> LoadedSae:
    return make_tiny_sae()


@pytest.fixture(scope="session")
def embedded_lm():
    """The real embedded Gemma 3 270M (first load in a fresh cache takes about two minutes)."""
    from saesteer.models import load_model

    return load_model()


# ---------------------------------------------------------------------------------------------------
# The app under AppTest (tests/test_app.py, tests/test_robustness*.py)


@pytest.fixture
def fixture_env(monkeypatch):
    """The app on the tiny test fixture (SAESTEER_TEST_FIXTURE=tiny), offline."""
    monkeypatch.setenv("SAESTEER_TEST_FIXTURE", "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture
def real_mode(monkeypatch, tmp_path):
    """The app's real loaders, with the hub forced offline so nothing is downloaded; the test's tmp_path is an
    allowed root for paths typed into the sidebar."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("SAESTEER_TEST_FIXTURE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("SAESTEER_ALLOWED_ROOTS", str(tmp_path))
    yield


# ---------------------------------------------------------------------------------------------------
# Gemma Scope 2 in a local Hugging Face hub cache (tests/test_gemmascope.py, tests/test_app_gemmascope.py)

SCOPE_RELEASE = "gemma-scope-2-270m-pt-res"
SCOPE_ID = "layer_12_width_16k_l0_medium"
SCOPE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_scope_weights(d_in: int = 64, d_sae: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny JumpReLU SAE in Gemma Scope 2's own tensor names (``params.safetensors``)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w_enc": torch.randn(d_in, d_sae, generator=g) * 0.3,
        "w_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
        "b_enc": torch.randn(d_sae, generator=g).abs() * 0.5,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
        "threshold": torch.rand(d_sae, generator=g) * 0.5,
    }


def write_scope_cache(cache_dir, release: str = SCOPE_RELEASE, sae_id: str = SCOPE_ID, weights: dict | None = None) -> dict:
    """Put an SAE into ``cache_dir`` as ``huggingface_hub`` lays out a download: blobs named by their sha256,
    ``snapshots/<commit>/<folder>/{params.safetensors,config.json}`` linking to them, ``refs/main`` naming the
    commit. The repository and folder are the ones sae-lens' directory gives for ``release``/``sae_id``."""
    import hashlib
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    weights = weights if weights is not None else make_scope_weights()
    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    layer = int(sae_id.split("_")[1])
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "hf_hook_point_in": f"model.layers.{layer}.output",
              "width": int(weights["w_enc"].shape[1])}
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SCOPE_COMMIT)
    files = {f"{folder}/params.safetensors": save({k: v.contiguous() for k, v in weights.items()}), f"{folder}/config.json": json.dumps(config).encode()}
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / SCOPE_COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    return weights


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails at once and is recorded."""
    import socket

    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access refused in this test: {address!r}")

    def no_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"name lookup refused in this test: {host!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    return attempts


@pytest.fixture
def scope_hub(monkeypatch, tmp_path):
    """An empty local hub cache in tmp_path, with the hub client in offline mode (what HF_HUB_CACHE and
    HF_HUB_OFFLINE=1 set at import)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache
