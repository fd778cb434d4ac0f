"""Run the steering evaluation on a CUDA machine with no network (how the README's results were made).

``smoke`` runs the whole protocol on the tiny test model on cuda (seconds) to catch device bugs before the
real run. ``run L [L ...]`` evaluates the embedded model at those bundled layers with the CLI's defaults
(the paper's strength grid, 20 prefixes, 24 new tokens, 30 concepts) — one process per layer, in parallel —
under a time limit, then packs each output directory into $OUT/eval_L<layer>.tar.gz (partial runs too:
``python -m saesteer eval --resume`` continues them). The embedded model's GGUF is reassembled at /tmp/gg
from carried chunks; sae-lens travels as wheels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def smoke() -> None:
    import torch

    from saesteer.baselines import LoraParams
    from saesteer.evaluation import EvalParams, FeatureBank, run_evaluation
    from saesteer.features import compute_many
    from saesteer.models import LoadedModel
    from saesteer.saes import LoadedSae
    from saesteer.testing import EVAL_DOCS, EVAL_PREFIXES, make_tiny_model, make_tiny_sae

    # The protocol at the smallest sizes that run every stage (test_evaluate's tiny run).
    params = EvalParams(
        strengths=(0.5, 4.0, 16.0), diffmean_coeffs=(0.5, 3.0), n_prefixes=4, max_new_tokens=6,
        n_concept_texts=4, min_concept_texts=5, n_neutral_texts=8, lora=LoraParams(rank=2, steps=2, batch_size=2),
        theta=0.5, tau=0.0138, min_contexts=5,  # the tiny model's feature data has few top contexts
    )

    cuda = torch.device("cuda")
    tiny = make_tiny_model()
    lm = LoadedModel(model=tiny.model.to(cuda), tokenizer=tiny.tokenizer, name=tiny.name, device=cuda, dtype=torch.float32)
    s = make_tiny_sae()
    sae = LoadedSae(sae=s.sae.to(cuda), id=s.id, hook_name=s.hook_name, layer=s.layer)
    seqs = [lm.tokenizer(d.text).input_ids for d in EVAL_DOCS] * 4
    data = compute_many(lm, [sae], corpus_sequences=seqs, n_tokens=None, cache=False, use_bundled=False, top_n=12)[0]
    bank = FeatureBank.from_feature_data(data, "tiny")
    t0 = time.time()
    res = run_evaluation(lm, sae, bank, ["zebra", "apple", "dog", "king"], "/tmp/smoke_eval", params, prefixes=EVAL_PREFIXES,
                         n_concepts=3, docs=EVAL_DOCS, log=print)
    print(res.methods().to_string(), flush=True)
    print(f"smoke ok in {time.time() - t0:.1f}s on {torch.cuda.get_device_name(0)}", flush=True)


def run(layers: list[int], limit: int) -> None:
    out = Path(os.environ["OUT"])
    env = dict(os.environ)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "saesteer", "info"], check=True, env=env)  # assembles the model cache once
    print(f"model cache ready in {time.time() - t0:.0f}s", flush=True)
    procs = {}
    for layer in layers:
        log = open(f"/tmp/eval_L{layer}.log", "w")
        procs[layer] = (subprocess.Popen(
            ["timeout", str(limit), sys.executable, "-m", "saesteer", "eval", "--layer", str(layer), "--out", f"/tmp/ev/L{layer}",
             "--resume"], env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for layer, (p, log) in procs.items():
        p.wait()
        log.close()
        print(f"layer {layer}: exit {p.returncode} after {time.time() - t0:.0f}s", flush=True)
        print(Path(f"/tmp/eval_L{layer}.log").read_text()[-3000:], flush=True)
        with tarfile.open(out / f"eval_L{layer}.tar.gz", "w:gz") as tar:
            tar.add(f"/tmp/ev/L{layer}", arcname=f"L{layer}")
            tar.add(f"/tmp/eval_L{layer}.log", arcname=f"L{layer}/run.log")


if __name__ == "__main__":
    if sys.argv[1] == "smoke":
        smoke()
    else:
        run([int(x) for x in sys.argv[2:]], int(os.environ.get("LIMIT", "420")))
