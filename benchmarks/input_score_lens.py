"""Why the median input score is 0 on the bundled SAEs: do features that fire on one token promote it?

The paper's input score is the share of a feature's top contexts whose max-activating token is one of its
top-k logit-lens tokens. This takes the bundled feature data's top-20 contexts. It calls a feature a *token
detector* when at least half of them peak on the same token t. For each detector it ranks t in the feature's
logit lens, computed two ways: the shipped lens (final norm, then the head) and the head alone (W_U · d_f).
It prints, per layer, the share of detectors whose t is in the top 20,
and the median rank of t.

    nice -n 5 python benchmarks/input_score_lens.py [--layers 2,8] [--k 20]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    lm = load_model()
    head = lm.lm_head.weight
    lenses = {
        "shipped lens (final norm + head)": lambda x: lm.lm_head(lm.final_norm(x)),
        "head only (W_U d)": lambda x: x @ head.T,
    }
    for layer in (int(x) for x in args.layers.split(",")):
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
                ranks = []
                for i in range(0, len(fs), 256):
                    logits = fn(dirs[i : i + 256]).float()
                    target = logits.gather(1, ts[i : i + 256, None].to(logits.device))
                    ranks += (logits > target).sum(1).tolist()
                ranks = np.array(ranks)
                parts.append(f"{name}: {np.mean(ranks < args.k):.1%} in the top {args.k}, median rank {int(np.median(ranks))}")
        print(f"L{layer}: {len(dets)} token detectors of {scored} scored features (vocabulary {lm.vocab_size}); " + "; ".join(parts))


if __name__ == "__main__":
    main()
