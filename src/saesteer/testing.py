"""Test doubles that ship with the package: a tiny random Gemma-3 model with a word-level tokenizer, tiny
random SAEs, a Gemma Scope 2 SAE laid out in a local hub cache, and feature data computed on them.

The test suite, the benchmarks and the app's test-fixture mode (``SAESTEER_TEST_FIXTURE=tiny``) build them
from here. Nothing downloads anything; the tiny model is built from a config in milliseconds. The numbers
they give mean nothing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .config import ScoreParams
from .features import Context, FeatureData
from .models import LoadedModel
from .saes import LoadedSae

TINY_MODEL = "tiny-gemma3"
#: Layers the app's test fixture offers an SAE at.
TINY_LAYERS = (1, 2, 3)

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
    return LoadedModel(model=model, tokenizer=tok, name=TINY_MODEL, device=torch.device("cpu"), dtype=torch.float32)


def make_tiny_sae(d_in: int = 64, d_sae: int = 128, layer: int = 2, arch: str = "topk", seed: int = 0, k: int = 8) -> LoadedSae:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name=TINY_MODEL)
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


# ---------------------------------------------------------------------------------------------------
# Feature data for the app's test fixture: computed by the real pipeline on the tiny random model over random
# word sequences, plus one planted context of HTML-like tokens so that the browser test can check that the
# app shows such tokens literally.

XSS_TOKENS = ("<script>alert(1)</script>", " and ", "<img src=x onerror=alert(1)>", " done")


class PlantedFeatureData(FeatureData):
    """The real FeatureData (same class behaviour: an unhashable dataclass) whose ``contexts(feature)``
    starts with one planted context for ``planted_feature`` (test fixture only)."""

    planted_feature: int = -1

    def contexts(self, feature: int, limit: int | None = None) -> list[Context]:
        found = super().contexts(feature, limit)
        if int(feature) != self.planted_feature:
            return found
        top = max((c.activation for c in found), default=1.0)
        planted = Context(list(XSS_TOKENS), [-1] * len(XSS_TOKENS), [0.5 * top, 0.0, top, 0.1 * top], 2, top, -1)
        return [planted, *found]


def with_planted_context(data: FeatureData, feature: int) -> PlantedFeatureData:
    out = PlantedFeatureData(**{f.name: getattr(data, f.name) for f in fields(FeatureData) if f.init and not f.name.startswith("_")})
    out.planted_feature = int(feature)
    return out


def word_sequences(tokenizer, words: Sequence[str], n: int = 96, length: int = 24, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [tokenizer(" ".join(rng.choice(words) for _ in range(length)))["input_ids"] for _ in range(n)]


def tiny_feature_data(lm, sae, words: Sequence[str]):
    from .features import compute_many

    data = compute_many(lm, [sae], word_sequences(lm.tokenizer, words), ScoreParams(batch_size=64), n_tokens=None, cache=False, use_bundled=False)[0]
    best = int(data.table.sort_values("output_score", ascending=False)["feature"].iloc[0])
    return with_planted_context(data, best)


# ---------------------------------------------------------------------------------------------------
# Gemma Scope 2 in a local Hugging Face hub cache

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


@dataclass(frozen=True)
class TinyLoader:
    """Rebuilds the tiny model and SAEs from their seeds in another process (a Ray worker: see
    :mod:`saesteer.distributed`); an SAE ref is (arch, layer, seed, width)."""

    def model(self) -> LoadedModel:
        return make_tiny_model()

    def sae(self, ref, lm) -> LoadedSae:
        arch, layer, seed, width = ref
        sae = make_tiny_sae(d_sae=width, layer=layer, arch=arch, seed=seed)
        sae.id = f"tiny-{arch}-L{layer}-s{seed}"
        return sae
