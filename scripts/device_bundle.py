"""Build the bundled SAEs on a CUDA machine with no network (how the shipped bundle was made).

Inputs travel with the checkout: the embedded model's GGUF (reassembled at $GGUF), sequences pre-tokenised
on the CPU machine by ``bundle.tokenize_corpus`` (train / held-out .npy), and the sae-lens wheels. The work
is ``bundle.build_bundle`` — the same code the CPU ``build-bundle`` command runs — on cuda. Outputs go to
$OUT: one fp16 safetensors file per SAE plus a tarball with the cfg.json files and the manifest.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saesteer.bundle import build_bundle  # noqa: E402
from saesteer.config import TrainParams  # noqa: E402
from saesteer.models import LoadedModel  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM

    out = Path(os.environ["OUT"])
    gguf = Path(os.environ["GGUF"])
    carry = Path(os.environ.get("CARRY", ".devcarry"))
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.to("cuda").eval().requires_grad_(False)
    lm = LoadedModel(model=model, tokenizer=None, name="gemma-3-270m", device=torch.device("cuda"), dtype=torch.float32)
    print(f"model loaded in {time.time() - t0:.1f}s", flush=True)
    train = np.load(carry / "train_ids.npy")
    held = np.load(carry / "heldout_ids.npy")
    params = TrainParams(
        layers=(2, 5, 8, 11, 14, 17), width=4096, k=64, tokens=int(train.shape[0] * 127), epochs=5.0,
        context_size=128, batch_size=2048, lr=4e-4, seed=0, heldout_tokens=int(held.shape[0] * 127),
        extra={"built_on": torch.cuda.get_device_name(0), "corpus_sha256_16": os.environ.get("CORPUS_HASH", "")},
    )
    root = Path("/tmp/bundle_out")
    manifest = build_bundle(lm, params, train, held, root, Path("/tmp/bundle_work"), corpus_id=os.environ.get("CORPUS_HASH", ""),
                            ce_sequences=512)
    print(json.dumps({e["id"]: e["metrics"] for e in manifest["saes"]}, indent=1), flush=True)
    print("seconds", manifest["seconds"], flush=True)
    for e in manifest["saes"]:
        (root / e["dir"] / "sae_weights.safetensors").rename(out / f"{e['id']}.safetensors")
    with tarfile.open(out / "meta.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="saes")


if __name__ == "__main__":
    main()
