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
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name="tiny-gemma3")
    torch.manual_seed(seed)
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
        sae.b_enc.abs_()  # some features fire on most inputs
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
