"""Rebuild the bundled SAEs so that the decoder bias carries what every token shares (how the shipped bundle was made).

The first bundle's largest latent at nearly every token was a latent of density ≈ 1 carrying Gemma 3's shared
residual component (see ``saesteer.diagnostics``). This rebuild fine-tunes those SAEs with sae-lens on residuals
centred at their geometric median, with the dense latents re-initialised (``bundle.finetune_saes``), then
measures them and recomputes the shipped feature data. Every stage resumes where it stopped:

1. ``collect``: one model pass records ``blocks.L.hook_resid_post`` for the training tokens and the held-out
   tokens into float32 shards (``bundle.collect_activations_from_ids``).
2. ``train``: ``bundle.finetune_saes`` from ``--init`` (the previous bundle), ``--epochs`` passes.
3. ``measure``: FVE, dead fraction, CE loss recovered and the diagnostics (before and after) on held-out text;
   writes ``manifest.json`` with provenance, then installs the SAEs under ``--out``.
4. ``features``: the input-score pass over every collected training token (read back from the shards, not
   re-run), logit lens and output scores; the top contexts trimmed for shipping under ``assets/features``.

    python scripts/rebuild_bundle.py --init DIR_OF_THE_FIRST_BUILD [--stages collect,train,measure,features]

``--stages collect,features --layers 5,8,11,14,17 --tokens 1097280`` recomputes only the feature data of those
layers from a longer activation pass (how L5–L17 got their 1,097,280-token input scores).

``--layers 2`` redoes some layers only: their manifest entries are replaced, the others kept (how L2 was refined
on more tokens with a longer dead-latent window; see the manifest's per-SAE ``training``).

A layer outside the bundle (``--layers 0 --from-scratch``) is trained and installed beside the others, with no
"before" diagnostics (how the L0 experiment of ``benchmarks/results/input_score_lens.md`` was made; it is not
shipped: ``git checkout assets/`` and removing its two folders undoes it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saesteer.bundle import (  # noqa: E402
    ce_loss_recovered,
    collect_activations_from_ids,
    finetune_saes,
    load_shards,
    reconstruction_metrics,
    sae_id_for,
    tokenize_corpus,
)
from saesteer.config import TrainParams  # noqa: E402
from saesteer.corpus import corpus_hash, iter_bundled  # noqa: E402
from saesteer.diagnostics import diagnose  # noqa: E402
from saesteer.models import load_model  # noqa: E402
from saesteer.paths import BUNDLED_SAES, bundled_feature_dir  # noqa: E402
from saesteer.saes import LoadedSae  # noqa: E402

LAYERS = (2, 5, 8, 11, 14, 17)
STAGES = ("collect", "train", "measure", "features")


def _load_dir(path: Path):
    from sae_lens import SAE

    return SAE.load_from_disk(str(path), device="cpu")


def _as_loaded(sae, layer: int, sae_id: str) -> LoadedSae:
    return LoadedSae(sae=sae, id=sae_id, hook_name=f"blocks.{layer}.hook_resid_post", layer=layer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", type=Path, required=True, help="the previous bundle's SAE folder (one sub-folder per SAE id)")
    ap.add_argument("--work", type=Path, default=Path("work/rebuild"), help="shards, checkpoints, trained SAEs (resumable)")
    ap.add_argument("--out", type=Path, default=BUNDLED_SAES / "gemma-3-270m", help="where the SAEs and manifest are installed")
    ap.add_argument("--tokens", type=int, default=690_880, help="training tokens collected (all feed the input-score pass; 170 shards)")
    ap.add_argument("--heldout-tokens", type=int, default=140_000)
    ap.add_argument("--epochs", type=float, default=2.5)
    ap.add_argument("--train-shards", type=int, default=55, help="the first N activation shards (4064 tokens each) train the SAEs; "
                    "every collected shard feeds the input-score pass")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)), help="comma-separated subset of the bundled layers to rebuild")
    ap.add_argument("--dead-window-tokens", type=int, default=None,
                    help="tokens a latent may go without firing before the AuxK loss counts it dead (default: a tenth of the run)")
    ap.add_argument("--from-scratch", action="store_true",
                    help="train the layers from sae-lens' random TopK init on the centred residuals instead of fine-tuning --init "
                         "(--init still gives the 'before' diagnostics)")
    ap.add_argument("--stages", default="all", help=f"comma-separated subset of {','.join(STAGES)}, or all")
    ap.add_argument("--keep", type=int, default=20, help="top contexts kept per feature in the shipped feature data")
    ap.add_argument("--window", type=int, default=16, help="tokens per shipped context window")
    args = ap.parse_args()
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    try:
        layers = tuple(int(x) for x in args.layers.split(","))
    except ValueError:
        ap.error(f"--layers {args.layers!r}: use comma-separated integers from {', '.join(map(str, LAYERS))}")
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}: use {', '.join(STAGES)} or all")
    lm = load_model()
    if not set(layers) <= set(range(lm.n_layers)):
        ap.error(f"--layers {args.layers!r}: {lm.name} has layers 0-{lm.n_layers - 1}; the bundle's are {', '.join(map(str, LAYERS))}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    params = TrainParams(layers=layers, width=4096, k=64, tokens=args.tokens, epochs=args.epochs, context_size=128,
                         batch_size=2048, lr=args.lr, seed=0, heldout_tokens=args.heldout_tokens)

    if "collect" in stages:
        t0 = time.time()
        train_ids, held_ids = work / "train_ids.npy", work / "heldout_ids.npy"
        if not train_ids.exists():
            np.save(train_ids, tokenize_corpus(lm.tokenizer, iter_bundled("train"), args.tokens, params.context_size))
            np.save(held_ids, tokenize_corpus(lm.tokenizer, iter_bundled("heldout"), args.heldout_tokens, params.context_size))
        if "measure" in stages:  # held-out residuals only serve the measure stage (a features-only run skips them)
            timings["heldout_tokens"] = collect_activations_from_ids(lm, np.load(held_ids), list(layers), work / "acts_heldout")
        n_train = collect_activations_from_ids(lm, np.load(train_ids), list(layers), work / "acts_train")
        timings.setdefault("collect_s", round(time.time() - t0, 1))
        timings.update(train_tokens=n_train)
        timings_path.write_text(json.dumps(timings, indent=1))

    trained_dir = work / "saes"
    if "train" in stages:
        t0 = time.time()
        missing = [l for l in layers if not (args.init / sae_id_for(l, params.width, params.k)).is_dir()]
        if missing and not args.from_scratch:
            raise SystemExit(f"--init {args.init} has no SAE at layer(s) {', '.join(map(str, missing))}: add --from-scratch to train them")
        shipped = {l: None if args.from_scratch else _load_dir(args.init / sae_id_for(l, params.width, params.k)) for l in layers}
        def first_shards(layer: int) -> torch.Tensor:
            files = sorted(p for p in (work / "acts_train" / f"L{layer}").glob("*.npy") if not p.name.endswith(".tmp.npy"))
            if len(files) < args.train_shards:
                raise SystemExit(f"only {len(files)} training shards of layer {layer} are collected; --train-shards asks for {args.train_shards}")
            return torch.from_numpy(np.concatenate([np.load(f) for f in files[: args.train_shards]]))

        _, info = finetune_saes(first_shards, shipped, params, trained_dir, lm.name, checkpoint_dir=work / "checkpoints",
                                dead_window_tokens=args.dead_window_tokens)
        timings["train_s"] = round(time.time() - t0, 1)
        timings["train_tokens_used"] = args.train_shards * 32 * (params.context_size - 1)
        timings["train_visits_per_second_per_sae"] = round(timings["train_tokens_used"] * args.epochs / timings["train_s"], 1)
        timings_path.write_text(json.dumps(timings, indent=1))
        (work / "finetune_info.json").write_text(json.dumps({str(k): v for k, v in info.items()}, indent=1))

    if "measure" in stages:
        import sae_lens

        t0 = time.time()
        info = json.loads((work / "finetune_info.json").read_text())
        held_ids = np.load(work / "heldout_ids.npy")
        new = {l: _load_dir(trained_dir / sae_id_for(l, params.width, params.k)) for l in layers}
        ce = ce_loss_recovered(lm, new, torch.as_tensor(held_ids[:64], dtype=torch.long))
        entries = []
        for l in layers:
            sae_id = sae_id_for(l, params.width, params.k)
            held = torch.from_numpy(load_shards(work / "acts_heldout", l))
            n_held = len(held)
            init_dir = args.init / sae_id  # a layer new to the bundle (L0) has no "before"
            before = diagnose(_as_loaded(_load_dir(init_dir), l, sae_id), held) if init_dir.is_dir() else None
            after = diagnose(_as_loaded(new[l], l, sae_id), held)
            metrics = {**reconstruction_metrics(new[l], held), **ce[l]}
            entries.append({
                "id": sae_id, "dir": sae_id, "layer": l, "width": params.width, "k": params.k,
                "hook": f"blocks.{l}.hook_resid_post", "architecture": "topk", "metrics": metrics,
                "diagnostics": after.to_dict(), "diagnostics_before_rebuild": None if before is None else before.to_dict(),
                "rebuild": info[str(l)],
                "training": {"tokens": timings.get("train_tokens_used"), "epochs": args.epochs, "lr": args.lr,
                             "dead_window_tokens": args.dead_window_tokens, "train_s": timings.get("train_s"),
                             "init": info[str(l)]["init"] if args.from_scratch else str(args.init)},
            })
            print(f"L{l}: {after.summary()}  (before: {'none, new layer' if before is None else before.summary()})", flush=True)
        manifest = {
            "model": lm.name,
            "corpus": corpus_hash(),
            "sae_lens_version": sae_lens.__version__,
            "trainer": "sae_lens.training.multi_sae_trainer.MultiSAETrainer (TopKTrainingSAE), cached activations; "
                       "fine-tuned from the first bundle on residuals centred at their geometric median "
                       "(centre folded into b_dec; latents of density > 0.5 re-initialised) — bundle.finetune_saes",
            "built_by": "scripts/rebuild_bundle.py",
            "tokens_collected": timings.get("train_tokens"),
            "tokens_trained_on": timings.get("train_tokens_used"),
            "token_visits_per_sae": int(timings.get("train_tokens_used", 0) * args.epochs),
            "heldout_tokens": n_held,
            "ce_heldout_tokens": int(min(64, len(held_ids)) * (held_ids.shape[1] - 2)),
            "seed": params.seed,
            "hyperparameters": {k: v for k, v in vars(params).items() if k != "extra"},
            "device": "cpu",
            "seconds": {k: v for k, v in timings.items() if k.endswith("_s")},
            "first_bundle": "fine-tuned from the H200 build of 2.69 M tokens × 5 epochs (git history of assets/saes)",
            "saes": entries,
        }
        timings["measure_s"] = round(time.time() - t0, 1)
        timings_path.write_text(json.dumps(timings, indent=1))
        manifest["seconds"] = {k: v for k, v in timings.items() if k.endswith("_s")}
        old_path = args.out / "manifest.json"
        if set(layers) != set(LAYERS) and old_path.exists():  # a partial rebuild: keep the other layers' entries
            old = json.loads(old_path.read_text())
            redone = {e["id"] for e in entries}
            kept = [e for e in old["saes"] if e["id"] not in redone]
            old["saes"] = sorted(kept + entries, key=lambda e: e["layer"])
            old.setdefault("partial_rebuilds", []).append(
                {"layers": list(layers), "tokens_collected": timings.get("train_tokens"), "seconds": manifest["seconds"]})
            manifest = old
        args.out.mkdir(parents=True, exist_ok=True)
        for e in entries:
            dst = args.out / e["dir"]
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(trained_dir / e["dir"], dst)
        (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        print(f"installed {len(entries)} SAEs and manifest.json under {args.out}", flush=True)

    if "features" in stages:
        from tqdm.auto import tqdm

        from saesteer.activations import iter_residual_shards
        from saesteer.config import SaeSpec
        from saesteer.features import compute_many, trim_contexts
        from saesteer.saes import list_bundled, load_sae

        t0 = time.time()
        saes = [load_sae(SaeSpec(source="bundled", sae_id=e["id"]), lm) for e in list_bundled() if e["layer"] in layers]
        names = sorted(p.name for p in (work / "acts_train" / "token_ids").glob("*.npy") if not p.name.endswith(".tmp.npy"))
        rows = [list(map(int, r)) for n in names for r in np.load(work / "acts_train" / "token_ids" / n)]
        bars: dict[str, tqdm] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage))
            bar.n = done
            bar.refresh()

        data = compute_many(lm, saes, rows, n_tokens=None, progress=progress, corpus_name="bundled:train", use_bundled=False,
                            residuals=lambda: iter_residual_shards(work / "acts_train", sorted({s.layer for s in saes})))
        for sae, fd in zip(saes, data):
            out = bundled_feature_dir(lm.name, sae.id)
            if out.exists():
                shutil.rmtree(out)
            trim_contexts(fd, args.keep, args.window).save(out)
            print(f"{sae.id}: {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB, "
                  f"{fd.meta['n_tokens']} tokens)", flush=True)
        timings["features_s"] = round(time.time() - t0, 1)
        timings_path.write_text(json.dumps(timings, indent=1))
    print(json.dumps(timings), flush=True)


if __name__ == "__main__":
    main()
