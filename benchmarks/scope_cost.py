"""What scoring a Gemma Scope 2-sized SAE costs per feature on this machine, and how good the estimate is.

    nice -n 5 python benchmarks/scope_cost.py [--layer 12] [--width 262144] [--check-features 1024] [--check-tokens 20000]

No download: the SAE is a *random* JumpReLU SAE with Gemma Scope 2's shape (d_in 640, the given width) at
``blocks.L.hook_resid_post`` of the embedded Gemma 3 270M, one global threshold aimed at ``--l0`` active latents
per token (the yaml's "medium" L0 is 60; the run prints the L0 it got, 13.6 in the README's run). Costs depend on
the shapes and, a little, on the sparsity, not on the weights' values.

1. ``subsets.measure_rates`` (what the app runs before it offers to start) and the estimates it gives for
   every Gemma Scope 2 width over the app's default 200,000 corpus tokens;
2. a real ``subsets.compute_subset`` run of ``--check-features`` random features over ``--check-tokens``
   tokens, timed, next to the estimate for that run (``--check-features 0`` skips it).
"""

from __future__ import annotations

import argparse
import resource
import time
from itertools import islice

import torch

from saesteer.corpus import iter_bundled, pack_sequences
from saesteer.gemmascope import WIDTHS
from saesteer.models import load_model
from saesteer.saes import LoadedSae
from saesteer.steering import capture_residuals, run_until_stop
from saesteer.subsets import compute_subset, format_duration, measure_rates, sample_features


def random_jumprelu(lm, layer: int, width: int, l0: float, seed: int = 0) -> LoadedSae:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name="random")
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=lm.d_model, d_sae=width, metadata=meta))
    seqs = list(islice(pack_sequences(lm.tokenizer, iter_bundled("heldout"), 128), 4))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / lm.d_model**0.5)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(width, lm.d_model), dim=1))
        with lm.lock, capture_residuals(lm, [layer], stop=True) as resid:
            run_until_stop(lambda: lm.model.get_decoder()(input_ids=torch.tensor(seqs), use_cache=False))
        x = resid[layer][:, 1:].reshape(-1, lm.d_model)  # BOS left out
        pre = x @ sae.W_enc  # (tokens, width)
        sae.threshold.fill_(float(torch.quantile(pre.flatten()[:: max(1, pre.numel() // 10_000_000)], 1 - l0 / width)))
    return LoadedSae(sae=sae, id=f"random-jumprelu-L{layer}-w{width}", hook_name=meta.hook_name, layer=layer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--width", type=int, default=WIDTHS["262k"])
    ap.add_argument("--l0", type=float, default=60.0)
    ap.add_argument("--check-features", type=int, default=1024)
    ap.add_argument("--check-tokens", type=int, default=20_000)
    args = ap.parse_args()

    lm = load_model()
    sae = random_jumprelu(lm, args.layer, args.width, args.l0)
    corpus = pack_sequences(lm.tokenizer, iter_bundled("train"), 128)
    t = time.perf_counter()
    rates = measure_rates(lm, sae, corpus)
    print(f"measure_rates: {time.perf_counter() - t:.1f} s ({rates.probe})")
    print(f"  forward to layer {args.layer}: {rates.forward_s_per_token * 1e3:.2f} ms/token; encoding: {rates.encode_s_per_feature_token * 1e9:.1f} ns per feature-token; "
          f"logit lens {rates.lens_s_per_feature * 1e3:.2f} ms/feature; output score {rates.output_s_per_feature * 1e3:.2f} ms/feature")
    for label, width in WIDTHS.items():
        print(f"  all {label}: {rates.estimate(width, 200_000).summary()}")

    if args.check_features <= 0:
        return
    feats = sample_features(sae.width, args.check_features, seed=1)
    predicted = rates.estimate(len(feats), args.check_tokens)
    t = time.perf_counter()
    data = compute_subset(lm, sae, feats, pack_sequences(lm.tokenizer, iter_bundled("train"), 128), n_tokens=args.check_tokens, cache=False)
    took = time.perf_counter() - t
    fired = float((data.table["density"] * sae.width).mean()) if len(data.table) else float("nan")
    print(f"check: {len(feats)} random features over {args.check_tokens:,} tokens took {format_duration(took)} ({took:.1f} s); "
          f"estimated {format_duration(predicted.total_s)} ({predicted.total_s:.1f} s): measured / estimated = {took / predicted.total_s:.2f}")
    print(f"  mean density × width over the subset (≈ L0 if the subset is representative): {fired:.1f}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    print(f"  subset rows: {len(data.table)}, features with ≥ 10 contexts: {int((data.table['n_contexts'] >= 10).sum())}")


if __name__ == "__main__":
    main()
