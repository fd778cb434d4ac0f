"""Build the offline bundle: residual activations of the embedded model, sae-lens TopK SAEs, quality metrics.

Pipeline (each stage resumes where it stopped):
1. ``collect_in_memory`` / ``collect_activations_from_ids``: one forward pass over the tokenised corpus records
   ``blocks.L.hook_resid_post`` for every requested layer at once (BOS excluded), in memory (GPU) or as
   resumable float32 shards on disk (CPU).
2. ``train_saes``: sae-lens ``MultiSAETrainer`` trains one TopK SAE per layer in lockstep from those shards,
   several epochs (the model forward is the expensive part on a CPU, so it is paid once); sae-lens
   checkpoints make it resumable.
3. ``evaluate_sae``: L0, mean-centred FVE, dead fraction and CE-loss recovered on held-out text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import Doc, pack_sequences
from .models import LoadedModel
from .steering import capture_residuals, run_until_stop


def shard_dir(root: Path, layer: int) -> Path:
    return root / f"L{layer}"


def load_shards(root: Path, layer: int) -> np.ndarray:
    """All shards of one layer concatenated: (tokens, d_model) fp16."""
    files = sorted(p for p in shard_dir(root, layer).glob("*.npy") if not p.name.endswith(".tmp.npy"))
    if not files:
        raise FileNotFoundError(f"no activation shards under {shard_dir(root, layer)}")
    return np.concatenate([np.load(f) for f in files])


# ---------------------------------------------------------------------------------------------------
# Training (sae-lens MultiSAETrainer over cached activations)

class ShardBatches:
    """sae-lens multi-hook data provider: shuffled batches {hook_name: (batch, d_model) float32} from shards.

    Deterministic given the seed; ``start`` skips already-consumed batches so a resumed run continues the
    same sequence. Epoch e uses permutation seed + e over all cached tokens.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], batch_size: int, seed: int, start: int = 0) -> None:
        self.arrays = arrays  # hook -> (tokens, d_model), fp16, on the training device
        self.n = next(iter(arrays.values())).shape[0]
        self.batch_size = batch_size
        self.seed = seed
        self.step = start
        self.per_epoch = self.n // batch_size
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def __iter__(self) -> "ShardBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        epoch, i = divmod(self.step, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._perm_epoch = epoch
        idx = self._perm[i * self.batch_size : (i + 1) * self.batch_size]
        self.step += 1
        return {hook: a[idx.to(a.device)].float() for hook, a in self.arrays.items()}


def sae_id_for(layer: int, width: int, k: int) -> str:
    return f"L{layer}-topk{k}-w{width}"


def train_saes(
    arrays: dict[int, torch.Tensor],
    params,
    out: Path,
    model_name: str,
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
) -> dict[int, object]:
    """Train one sae-lens TopK SAE per layer on cached activations (tokens × epochs visits each).

    ``arrays``: layer -> (tokens, d_model) fp16 tensor. Saves each SAE (inference format) to
    ``out/<sae id>/`` and returns layer -> SAE. Resumes from the newest checkpoint in ``checkpoint_dir``.
    """
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    from .hookpoints import tl_hook_name

    torch.manual_seed(params.seed)
    n_tokens = next(iter(arrays.values())).shape[0]
    total = int(n_tokens * params.epochs) // params.batch_size * params.batch_size
    steps = total // params.batch_size
    names = {sae_id_for(l, params.width, params.k): l for l in arrays}
    saes = {}
    for name, layer in names.items():
        cfg = TopKTrainingSAEConfig(
            d_in=next(iter(arrays.values())).shape[1],
            d_sae=params.width,
            k=params.k,
            device=device,
            normalize_activations="expected_average_only_in",
            metadata=SAEMetadata(model_name=model_name, hook_name=tl_hook_name(layer), context_size=params.context_size,
                                 prepend_bos=True, dataset_path="saesteer bundled corpus"),
        )
        saes[name] = TopKTrainingSAE(cfg)
    trainer_cfg = _trainer_config(params, total, device, checkpoint_dir, warm_up_cap=200, dead_window_divisor=40,
                                  n_norm_batches=min(50, steps))
    hooks = {name: tl_hook_name(layer) for name, layer in names.items()}
    data = {tl_hook_name(layer): arr for layer, arr in arrays.items()}
    trainer = MultiSAETrainer(trainer_cfg, saes, hooks, data_provider=ShardBatches(data, params.batch_size, params.seed))
    latest = _latest_checkpoint(checkpoint_dir)
    if latest is not None:
        # Scaling factors are re-estimated from the same first batches, so the resumed run matches.
        trainer.load_checkpoint(latest)
    trainer.data_provider.step = trainer.n_training_steps + (trainer_cfg.n_batches_for_norm_estimate if latest else 0)
    trained = trainer.fit()
    result = {}
    for name, sae in trained.items():
        layer = names[name]
        save_sae_fp16(sae, out / name)
        result[layer] = sae
    return result


def _trainer_config(params, total: int, device: str, checkpoint_dir: Path | None, warm_up_cap: int,
                    dead_window_divisor: int, n_norm_batches: int, dead_window: int | None = None):
    """sae-lens' trainer settings shared by a from-scratch build and a fine-tune: constant Adam lr with warm-up and
    a decay over the last fifth; windows scaled to the run's number of steps (``dead_window`` steps, when given,
    replaces the scaled window after which a latent that has not fired counts as dead for the AuxK loss)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    steps = total // params.batch_size
    return SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=params.batch_size,
        lr=params.lr,
        lr_end=params.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=min(warm_up_cap, steps // 10),
        lr_decay_steps=steps // 5,
        device=device,
        dead_feature_window=dead_window or max(20, min(1000, steps // dead_window_divisor)),
        feature_sampling_window=max(50, min(2000, steps // 5)),
        n_checkpoints=4 if checkpoint_dir else 0,
        checkpoint_path=str(checkpoint_dir) if checkpoint_dir else None,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=n_norm_batches,
    )


def _latest_checkpoint(root: Path | None) -> Path | None:
    if root is None or not root.exists():
        return None
    found = [p for p in root.rglob("*") if p.is_dir() and p.name.isdigit()]
    return max(found, key=lambda p: int(p.name)) if found else None


def save_sae_fp16(sae, path: Path) -> None:
    """Save in sae-lens inference format; the two weight matrices as fp16 (biases stay float32, since
    Gemma's residual has entries beyond the fp16 range). ``load_from_disk`` casts back to float32."""
    from safetensors.torch import load_file, save_file

    sae.save_inference_model(path)
    weights = path / "sae_weights.safetensors"
    state = load_file(weights)
    for name in ("W_enc", "W_dec"):
        half = state[name].to(torch.float16)
        if torch.isfinite(half).all():
            state[name] = half.contiguous()
    save_file(state, weights)


# ---------------------------------------------------------------------------------------------------
# Quality metrics on held-out text

@torch.no_grad()
def reconstruction_metrics(sae, acts: torch.Tensor, batch: int = 8192) -> dict:
    """L0, mean-centred fraction of variance explained, and dead fraction over ``acts`` (tokens, d_model)."""
    acts = acts.float()
    mean = acts.mean(0)
    sse = sst = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=acts.device)
    for i in range(0, len(acts), batch):
        x = acts[i : i + batch].to(sae.W_dec.device, sae.W_dec.dtype)
        a = sae.encode(x)
        x_hat = sae.decode(a)
        sse += float(((x - x_hat) ** 2).sum())
        sst += float(((x - mean.to(x.device)) ** 2).sum())
        nz = a != 0
        l0 += float(nz.sum())
        fired |= nz.any(0).to(fired.device)
    return {"l0": l0 / len(acts), "fve": 1 - sse / sst, "dead_fraction": 1 - float(fired.float().mean()), "heldout_tokens": len(acts)}


@torch.no_grad()
def ce_loss_recovered(lm: LoadedModel, saes_by_layer: dict[int, object], sequences: torch.Tensor, batch: int = 8) -> dict[int, dict]:
    """Next-token CE with each SAE spliced in (non-BOS positions) vs clean and zero-ablated residuals.

    recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean). BOS keeps its clean residual in all three runs,
    and its prediction is not scored, as the bundle excludes BOS from training and metrics.
    """
    from .steering import residual_edit

    def ce(edit_layer: int | None, fn) -> float:
        total, count = 0.0, 0
        for i in range(0, len(sequences), batch):
            ids = sequences[i : i + batch].to(lm.device)
            if edit_layer is None:
                logits = lm.model(input_ids=ids).logits
            else:
                with residual_edit(lm.layers[edit_layer], fn):
                    logits = lm.model(input_ids=ids).logits
            logp = torch.log_softmax(logits[:, 1:-1].float(), -1)  # predictions made at non-BOS positions
            tgt = ids[:, 2:]
            total += float(-logp.gather(-1, tgt[..., None]).sum())
            count += tgt.numel()
        return total / count

    def splice(sae):
        def fn(x):
            out = x.clone()
            out[:, 1:] = sae.decode(sae.encode(x[:, 1:].to(sae.W_dec.dtype))).to(x.dtype)
            return out
        return fn

    def zero(x):
        out = x.clone()
        out[:, 1:] = 0
        return out

    clean = ce(None, None)
    result = {}
    for layer, sae in saes_by_layer.items():
        with_sae = ce(layer, splice(sae))
        zeroed = ce(layer, zero)
        result[layer] = {
            "ce_clean": clean,
            "ce_with_sae": with_sae,
            "ce_zero_ablation": zeroed,
            "ce_loss_recovered": (zeroed - with_sae) / (zeroed - clean),
        }
    return result


# ---------------------------------------------------------------------------------------------------
# The whole build

def tokenize_corpus(tokenizer, docs: Iterable[Doc], n_tokens: int, context_size: int) -> np.ndarray:
    """(n_sequences, context_size) int32 token ids, BOS first, until ``n_tokens`` non-BOS tokens."""
    n_seq = math.ceil(n_tokens / (context_size - 1))
    rows = [s for _, s in zip(range(n_seq), pack_sequences(tokenizer, docs, context_size))]
    return np.asarray(rows, dtype=np.int32)


@torch.no_grad()
def collect_in_memory(lm: LoadedModel, sequences: np.ndarray, layers: list[int], batch: int = 64,
                      dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
    """Residuals (BOS dropped) for all ``layers`` in one pass, kept on the model's device.

    float32 by default: Gemma 3's deeper residuals exceed the fp16 range (training on fp16 copies diverged).
    """
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for i in tqdm(range(0, len(sequences), batch), desc="activations", unit="batch"):
        ids = torch.as_tensor(sequences[i : i + batch], dtype=torch.long, device=lm.device)
        with capture_residuals(lm, layers, stop=True) as acts:
            run_until_stop(lambda: lm.model.model(input_ids=ids, use_cache=False))
        for l in layers:
            out[l].append(acts[l][:, 1:].reshape(-1, lm.d_model).to(dtype))
    return {l: torch.cat(v) for l, v in out.items()}


def build_bundle(
    lm: LoadedModel,
    params,
    train_sequences: np.ndarray,
    heldout_sequences: np.ndarray,
    out_root: Path,
    work_dir: Path,
    corpus_id: str,
    ce_sequences: int = 64,
) -> dict:
    """Collect activations, train the SAEs, measure them and write ``out_root/manifest.json``."""
    import time

    import sae_lens

    t0 = time.time()
    device = str(lm.device)
    layers = list(params.layers)
    if lm.device.type == "cuda":
        train = collect_in_memory(lm, train_sequences, layers)
        heldout = collect_in_memory(lm, heldout_sequences, layers)
    else:
        collect_from = lambda seqs, d: collect_activations_from_ids(lm, seqs, layers, d)  # noqa: E731
        collect_from(train_sequences, work_dir / "acts_train")
        collect_from(heldout_sequences, work_dir / "acts_heldout")
        train = {l: torch.from_numpy(load_shards(work_dir / "acts_train", l)) for l in layers}
        heldout = {l: torch.from_numpy(load_shards(work_dir / "acts_heldout", l)) for l in layers}
    t_collect = time.time() - t0
    n_train = next(iter(train.values())).shape[0]
    trained = train_saes(train, params, out_root, lm.name, device=device, checkpoint_dir=work_dir / "checkpoints")
    t_train = time.time() - t0 - t_collect
    ce = ce_loss_recovered(lm, trained, torch.as_tensor(heldout_sequences[:ce_sequences], dtype=torch.long))
    entries = []
    for layer, sae in sorted(trained.items()):
        sae_id = sae_id_for(layer, params.width, params.k)
        metrics = {**reconstruction_metrics(sae, heldout[layer]), **ce[layer]}
        entries.append({
            "id": sae_id, "dir": sae_id, "layer": layer, "width": params.width, "k": params.k,
            "hook": f"blocks.{layer}.hook_resid_post", "architecture": "topk", "metrics": metrics,
        })
    manifest = {
        "model": lm.name,
        "corpus": corpus_id,
        "sae_lens_version": sae_lens.__version__,
        "trainer": "sae_lens.training.multi_sae_trainer.MultiSAETrainer (TopKTrainingSAE), cached activations",
        "tokens_collected": n_train,
        "token_visits_per_sae": int(n_train * params.epochs) // params.batch_size * params.batch_size,
        "heldout_tokens": next(iter(heldout.values())).shape[0],
        "ce_heldout_tokens": int(min(ce_sequences, len(heldout_sequences)) * (heldout_sequences.shape[1] - 2)),
        "seed": params.seed,
        "hyperparameters": {k: v for k, v in vars(params).items() if k != "extra"},
        "device": device,
        "seconds": {"collect": round(t_collect, 1), "train": round(t_train, 1), "total": round(time.time() - t0, 1)},
        "train_tokens_per_second": round(n_train * params.epochs / max(t_train, 1e-9), 1),
        "saes": entries,
        **params.extra,
    }
    out_root.mkdir(parents=True, exist_ok=True)
    path = out_root / "manifest.json"
    if path.exists():  # rebuilding some layers keeps the other layers' entries
        old = json.loads(path.read_text())
        kept = [e for e in old.get("saes", []) if e["layer"] not in params.layers]
        manifest["saes"] = sorted(kept + entries, key=lambda e: e["layer"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return manifest


def collect_activations_from_ids(lm: LoadedModel, sequences: np.ndarray, layers: list[int], out: Path, batch_sequences: int = 32) -> int:
    """Shard-writing, resumable variant of :func:`collect_in_memory` for CPU builds."""
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in tqdm(range(0, len(sequences) // batch_sequences), desc=f"activations -> {out.name}", unit="shard"):
        names = [shard_dir(out, l) / f"{i:05d}.npy" for l in layers]
        rows = sequences[i * batch_sequences : (i + 1) * batch_sequences]
        written += rows.shape[0] * (rows.shape[1] - 1)
        if all(p.exists() for p in names):
            continue
        ids_path = out / "token_ids" / f"{i:05d}.npy"  # read back by activations.iter_residual_shards
        ids_path.parent.mkdir(exist_ok=True)
        np.save(ids_path, np.asarray(rows, dtype=np.int32))
        acts = collect_in_memory(lm, rows, layers, batch=batch_sequences)
        for l, path in zip(layers, names):
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, acts[l].cpu().numpy())
            tmp.replace(path)
    return written


# ---------------------------------------------------------------------------------------------------
# Rebuild: move what every token shares into the decoder bias, then fine-tune (sae-lens trains)

@torch.no_grad()
def latent_density(sae, acts: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """Share of rows of ``acts`` (tokens, d_model) on which each latent is non-zero: (d_sae,) float64."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for i in range(0, len(acts), batch):
        a = sae.encode(acts[i : i + batch].float())
        fired += (a != 0).sum(0).double()
    return fired / len(acts)


def centred_scaled(raw: torch.Tensor, centre: torch.Tensor, scale: float, batch: int = 65536) -> torch.Tensor:
    """``(raw − centre) · scale`` as fp16, computed in float32 blocks (the raw residual overflows fp16; the centred,
    rescaled one has norm ≈ √d_model)."""
    out = torch.empty(raw.shape, dtype=torch.float16)
    for i in range(0, len(raw), batch):
        out[i : i + batch] = ((raw[i : i + batch].float() - centre) * scale).to(torch.float16)
    return out


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld iterations in float64 from the mean: the point minimising the summed distance to the rows of x."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-9)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = float((new - m).norm()) <= tol * max(float(m.norm()), 1.0)
        m = new
        if done:
            break
    return m


@torch.no_grad()
def centring_stats(raw: torch.Tensor, sample: int = 200_000, batch: int = 65536) -> tuple[torch.Tensor, float]:
    """The centre (geometric median of the first ``sample`` rows, float32) and sae-lens' scaling convention on
    the centred data: scale = √d / E‖x − centre‖, so the SAE sees inputs of average norm √d.

    The geometric median, not the mean: latents are non-negative, so the point the decoder adds them to is where
    most tokens sit when few latents fire; the mean is pulled off it by every feature's average activation.
    """
    centre = geometric_median(raw[:sample]).float()
    norms = 0.0
    for i in range(0, len(raw), batch):
        norms += float((raw[i : i + batch].float() - centre).norm(dim=1).double().sum())
    return centre, math.sqrt(raw.shape[1]) * len(raw) / norms


@torch.no_grad()
def init_from_shipped(train_sae, shipped, centre: torch.Tensor, scale: float, dense: torch.Tensor, seed: int) -> None:
    """Initialise a TopK training SAE that reads ``(x − centre) · scale`` from a shipped raw-space TopK SAE.

    The shipped SAE (decoder-norm-rescaled TopK, ``apply_b_dec_to_input``) computes ``pre = (x − b0) W_enc + b_enc``.
    With ``b_dec = 0`` on centred input, ``b_enc ← scale · (b_enc + (centre − b0) W_enc)`` gives ``scale · pre``:
    the same TopK choice and activations ``scale ×`` the raw ones, so every learned latent starts where it was.
    The ``dense`` latents (which carried what every token shares, now in the centre) are re-initialised as new
    random latents with sae-lens' TopK init (decoder norm 0.1, encoder = decoder transposed, zero bias).
    """
    We = shipped.W_enc.float()
    b0 = shipped.b_dec.float()
    train_sae.W_enc.copy_(We)
    train_sae.W_dec.copy_(shipped.W_dec.float())
    train_sae.b_enc.copy_(scale * (shipped.b_enc.float() + (centre - b0) @ We))
    train_sae.b_dec.zero_()
    idx = torch.nonzero(dense).flatten()
    if len(idx):
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(len(idx), We.shape[0], generator=g)
        d = 0.1 * d / d.norm(dim=1, keepdim=True)
        train_sae.W_dec[idx] = d
        train_sae.W_enc[:, idx] = d.T
        train_sae.b_enc[idx] = 0.0


SCRATCH_INIT = "sae-lens TopK init (from scratch)"
"""How a layer trained with ``shipped[L] = None`` was initialised (the manifest's ``rebuild.init``/``training.init``)."""


def finetune_saes(
    load_layer: Callable[[int], torch.Tensor],
    shipped: dict[int, object | None],
    params,
    out: Path,
    model_name: str,
    dense_threshold: float = 0.5,
    density_tokens: int = 100_000,
    checkpoint_dir: Path | None = None,
    dead_window_tokens: int | None = None,
) -> tuple[dict[int, object], dict[int, dict]]:
    """Fine-tune shipped TopK SAEs on centred activations with sae-lens' ``MultiSAETrainer``; fold the centre back.

    Per layer: the activations' geometric median moves into ``b_dec`` (the SAE trains on ``(x − centre) · scale``), latents of
    the shipped SAE with density > ``dense_threshold`` on the first ``density_tokens`` training tokens are
    re-initialised, the rest start from their shipped weights (:func:`init_from_shipped`). After training,
    sae-lens' ``fold_activation_norm_scaling_factor`` and ``b_dec += centre`` give an SAE on raw residuals.
    ``shipped[L] = None`` trains layer L from scratch on the same centred residuals (sae-lens' own TopK init).
    ``load_layer(L)`` returns layer L's raw training residuals (tokens, d_model); layers are loaded one at a time
    and kept only as centred fp16 copies. ``dead_window_tokens``: how many training tokens a latent may go without
    firing before the AuxK loss treats it as dead (default: a tenth of the run). A short window on a short run
    repurposes latents of rare tokens, which then never fire on held-out text. Returns layer -> trained SAE and layer -> what was done (centre norm,
    scale, re-initialised latents).
    """
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    from .hookpoints import tl_hook_name

    torch.manual_seed(params.seed)
    names = {sae_id_for(l, params.width, params.k): l for l in shipped}
    saes, data, info, centres = {}, {}, {}, {}
    n_tokens = 0
    for name, layer in names.items():
        x = load_layer(layer)
        n_tokens = len(x)
        centre, scale = centring_stats(x)
        scratch = shipped[layer] is None
        density = torch.zeros(params.width, dtype=torch.float64) if scratch else latent_density(shipped[layer], x[:density_tokens])
        dense = density > dense_threshold
        cfg = TopKTrainingSAEConfig(
            d_in=x.shape[1], d_sae=params.width, k=params.k, device="cpu", normalize_activations="none",
            metadata=SAEMetadata(model_name=model_name, hook_name=tl_hook_name(layer), context_size=params.context_size,
                                 prepend_bos=True, dataset_path="saesteer bundled corpus"),
        )
        sae = TopKTrainingSAE(cfg)
        if not scratch:
            init_from_shipped(sae, shipped[layer], centre, scale, dense, params.seed + layer)
        saes[name] = sae
        data[tl_hook_name(layer)] = centred_scaled(x, centre, scale)
        centres[layer] = centre
        info[layer] = {
            "centre_norm": float(centre.norm()), "scale": scale, "init": SCRATCH_INIT if scratch else "shipped",
            "reinitialised_latents": [int(i) for i in torch.nonzero(dense).flatten()],
            "reinitialised_densities": [round(float(density[i]), 4) for i in torch.nonzero(dense).flatten()],
        }
        del x  # the float32 copy; the centred fp16 one trains
    total = int(n_tokens * params.epochs) // params.batch_size * params.batch_size
    trainer_cfg = _trainer_config(params, total, "cpu", checkpoint_dir, warm_up_cap=50, dead_window_divisor=10, n_norm_batches=1,
                                  dead_window=None if dead_window_tokens is None else max(1, dead_window_tokens // params.batch_size))
    hooks = {name: tl_hook_name(layer) for name, layer in names.items()}
    trainer = MultiSAETrainer(trainer_cfg, saes, hooks, data_provider=ShardBatches(data, params.batch_size, params.seed))
    latest = _latest_checkpoint(checkpoint_dir)
    if latest is not None:
        trainer.load_checkpoint(latest)
    trainer.data_provider.step = trainer.n_training_steps
    trained = trainer.fit()
    result = {}
    for name, sae in trained.items():
        layer = names[name]
        sae.fold_activation_norm_scaling_factor(info[layer]["scale"])
        with torch.no_grad():
            sae.b_dec += centres[layer].to(sae.b_dec.dtype)
        save_sae_fp16(sae, out / name)
        result[layer] = sae
    return result, info
