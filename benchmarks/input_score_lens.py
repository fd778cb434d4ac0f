"""Why the median input score is 0 on the bundled SAEs: do features that fire on one token promote it?

The paper's input score is the share of a feature's top contexts whose max-activating token is one of its
top-k logit-lens tokens. This takes the bundled feature data's top-20 contexts. It calls a feature a *token
detector* when at least half of them peak on the same token t. For each detector it ranks t in the feature's
logit lens, computed two ways: the shipped lens (final norm, then the head) and the head alone (W_U · d_f).
It prints, per layer, the share of detectors whose t is in the top 20,
and the median rank of t.

``--token-means=-1,0,1,2`` (with ``=``: a leading -1 is not an option) asks the same of the model alone, with no SAE: for each frequent token t of some
held-out text, the mean residual at ``blocks.L.hook_resid_post`` over t's occurrences minus the mean over all
tokens is the direction an ideal detector of t would write; where does t rank in its logit lens? (``-1`` is the
token embedding itself.) This tells whether a layer can have input-score features at all.

    nice -n 5 python benchmarks/input_score_lens.py [--layers 2,8] [--k 20] [--token-means=-1,0,1,2] [--sequences 200]
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from saesteer.config import SaeSpec
from saesteer.features import FeatureData
from saesteer.models import load_model
from saesteer.paths import bundled_feature_dir
from saesteer.saes import load_sae


def detectors(data: FeatureData, share: float = 0.5, min_contexts: int = 10) -> list[tuple[int, int]]:
    """(feature, token) pairs where at least ``share`` of the feature's stored top contexts peak on ``token``."""
    out = []
    n_ctx, width = data.ctx_pos.shape[1], data.ctx_tokens.shape[2]
    for f in range(len(data.ctx_pos)):
        pos, toks = data.ctx_pos[f], data.ctx_tokens[f]
        peaks = [int(toks[i, pos[i]]) for i in range(n_ctx) if 0 <= pos[i] < width and toks[i, pos[i]] >= 0]
        if len(peaks) < min_contexts:
            continue
        token, count = collections.Counter(peaks).most_common(1)[0]
        if count >= share * len(peaks):
            out.append((int(data.features[f]), token))
    return out


@torch.no_grad()
def token_mean_ranks(lm, layers: list[int], n_sequences: int = 200, length: int = 128, min_count: int = 15) -> dict[int, dict[str, np.ndarray]]:
    """Layer -> lens name -> rank of t in the logit lens of (mean residual on t - mean residual), for every token t
    seen at least ``min_count`` times (BOS excluded) in the first ``n_sequences`` held-out documents."""
    from saesteer.corpus import iter_bundled
    from saesteer.steering import capture_residuals, run_until_stop

    seqs = []
    for doc in iter_bundled("heldout"):
        ids = lm.tokenizer(doc.text)["input_ids"][:length]
        if len(ids) > 32:
            seqs.append(ids)
        if len(seqs) >= n_sequences:
            break
    counts = torch.bincount(torch.tensor([t for ids in seqs for t in ids[1:]]), minlength=lm.vocab_size)
    tokens = torch.nonzero(counts >= min_count).flatten()
    row = torch.full((lm.vocab_size,), -1, dtype=torch.long)
    row[tokens] = torch.arange(len(tokens))
    hooked = [l for l in layers if l >= 0]
    sums = {l: torch.zeros(len(tokens) + 1, lm.d_model, dtype=torch.float64) for l in hooked}  # last row: all tokens
    for ids in seqs:
        x = torch.tensor([ids], device=lm.device)
        with capture_residuals(lm, hooked, stop=True) as acts:
            run_until_stop(lambda: lm.model.model(input_ids=x, use_cache=False))
        r = row[x[0, 1:].cpu()]
        for l in hooked:
            h = acts[l][0, 1:].double().cpu()
            sums[l][-1] += h.sum(0)
            sums[l].index_add_(0, r[r >= 0], h[r >= 0])
    lenses = _lenses(lm)
    out = {}
    for l in layers:
        if l < 0:
            dirs = lm.model.get_input_embeddings().weight[tokens.to(lm.device)].float()
        else:
            mean = sums[l][-1] / counts.sum()
            dirs = (sums[l][:-1] / counts[tokens, None].double() - mean).float()
        out[l] = {name: _ranks(fn, dirs.to(lm.device, lm.dtype), tokens) for name, fn in lenses.items()}
    return out


def _lenses(lm):
    head = lm.lm_head.weight
    return {
        "shipped lens (final norm + head)": lm.unembed,  # what scores.logit_lens ranks
        "head only (W_U d)": lambda x: x @ head.T,
    }


@torch.no_grad()
def _ranks(fn, dirs: torch.Tensor, tokens: torch.Tensor, chunk: int = 256) -> np.ndarray:
    ranks = []
    for i in range(0, len(tokens), chunk):
        logits = fn(dirs[i : i + chunk]).float()
        target = logits.gather(1, tokens[i : i + chunk, None].to(logits.device))
        ranks += (logits > target).sum(1).tolist()
    return np.array(ranks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--token-means", default="", help="also probe the model alone at these layers (-1: the embedding)")
    ap.add_argument("--sequences", type=int, default=200, help="held-out documents (128 tokens each) for --token-means")
    args = ap.parse_args()
    lm = load_model()
    lenses = _lenses(lm)
    for layer in (int(x) for x in args.layers.split(",") if x):
        sae = load_sae(SaeSpec(source="bundled", layer=layer), lm)
        data = FeatureData.load(bundled_feature_dir(lm.name, sae.id))
        dets = detectors(data)
        scored = int(np.isfinite(data.table["input_score"]).sum())
        fs = torch.tensor([f for f, _ in dets])
        ts = torch.tensor([t for _, t in dets])
        parts = []
        with torch.no_grad():
            dirs = sae.directions(fs).to(lm.device, lm.dtype)
        for name, fn in lenses.items():
            ranks = _ranks(fn, dirs, ts)
            parts.append(f"{name}: {np.mean(ranks < args.k):.1%} in the top {args.k}, median rank {int(np.median(ranks))}")
        print(f"L{layer}: {len(dets)} token detectors of {scored} scored features (vocabulary {lm.vocab_size}); " + "; ".join(parts))
    if args.token_means:
        probe = token_mean_ranks(lm, [int(x) for x in args.token_means.split(",")], args.sequences)
        for layer, by_lens in probe.items():
            where = "embedding" if layer < 0 else f"L{layer} token means"
            parts = [f"{name}: {np.mean(r < args.k):.1%} in the top {args.k}, median rank {int(np.median(r))}" for name, r in by_lens.items()]
            print(f"{where} ({len(next(iter(by_lens.values())))} tokens seen >= 15 times): " + "; ".join(parts))


if __name__ == "__main__":
    main()
