"""Build the offline bundle: residual activations of the embedded model, sae-lens TopK SAEs, quality metrics.

Pipeline (each stage resumes where it stopped):
1. ``collect_activations``: one forward pass over the corpus records ``blocks.L.hook_resid_post`` for every
   requested layer at once (BOS excluded), as fp16 shards on disk.
2. ``train_saes``: sae-lens ``MultiSAETrainer`` trains one TopK SAE per layer in lockstep from those shards,
   several epochs (the model forward is the expensive part on a CPU, so it is paid once); sae-lens
   checkpoints make it resumable.
3. ``evaluate_sae``: L0, mean-centred FVE, dead fraction and CE-loss recovered on held-out text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import Doc
from .models import LoadedModel
from .steering import capture_residuals, run_until_stop


def pack_sequences(tokenizer, docs: Iterable[Doc], context_size: int) -> Iterator[list[int]]:
    """Documents tokenised, joined by a blank line and cut into BOS + (context_size - 1) token sequences."""
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    body = context_size - 1
    buf: list[int] = []
    for doc in docs:
        buf.extend(tokenizer(doc.text, add_special_tokens=False).input_ids)
        buf.extend(sep)
        while len(buf) >= body:
            yield [tokenizer.bos_token_id, *buf[:body]]
            buf = buf[body:]


def shard_dir(root: Path, layer: int) -> Path:
    return root / f"L{layer}"


def collect_activations(
    lm: LoadedModel,
    docs: Iterable[Doc],
    layers: list[int],
    n_tokens: int,
    out: Path,
    context_size: int = 128,
    batch_sequences: int = 32,
) -> int:
    """Write fp16 residual activations (BOS dropped) for ``layers`` as shards ``out/L{layer}/{i:05d}.npy``.

    Shards are written in a fixed order, so an interrupted run resumes at the first missing shard.
    Returns the number of tokens on disk.
    """
    out.mkdir(parents=True, exist_ok=True)
    per_shard = batch_sequences * (context_size - 1)
    n_shards = math.ceil(n_tokens / per_shard)
    seqs = pack_sequences(lm.tokenizer, docs, context_size)
    ids_path = out / "token_ids"
    ids_path.mkdir(exist_ok=True)
    bar = tqdm(total=n_shards * per_shard, desc="activations", unit="tok", unit_scale=True)
    written = 0
    for i in range(n_shards):
        batch = [s for _, s in zip(range(batch_sequences), seqs)]
        if len(batch) < batch_sequences:
            break
        names = [shard_dir(out, layer) / f"{i:05d}.npy" for layer in layers]
        if all(p.exists() for p in names):
            bar.update(per_shard)
            written += per_shard
            continue
        input_ids = torch.tensor(batch, device=lm.device)  # (batch, pos)
        with torch.no_grad(), capture_residuals(lm, layers, stop=True) as acts:
            run_until_stop(lambda: lm.model.model(input_ids=input_ids, use_cache=False))
        for layer, path in zip(layers, names):
            path.parent.mkdir(exist_ok=True)
            x = acts[layer][:, 1:].reshape(-1, lm.d_model).to(torch.float16).cpu().numpy()
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, x)
            tmp.replace(path)
        np.save(ids_path / f"{i:05d}.npy", input_ids.cpu().numpy().astype(np.int32))
        bar.update(per_shard)
        written += per_shard
    bar.close()
    (out / "meta.json").write_text(json.dumps({"layers": layers, "tokens": written, "context_size": context_size}))
    return written


def load_shards(root: Path, layer: int) -> np.ndarray:
    """All shards of one layer concatenated: (tokens, d_model) fp16."""
    files = sorted(p for p in shard_dir(root, layer).glob("*.npy") if not p.name.endswith(".tmp.npy"))
    if not files:
        raise FileNotFoundError(f"no activation shards under {shard_dir(root, layer)}")
    return np.concatenate([np.load(f) for f in files])
