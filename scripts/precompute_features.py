"""Precompute the feature data shipped under assets/features/gemma-3-270m/ for every bundled SAE.

One activation pass over the bundled corpus (train split) serves all six SAEs; logit lens and output scores
per SAE; results go through the on-disk cache (resumable), then are trimmed for shipping: the input score
and context counts use the top-100 contexts, but only the top ``--keep`` contexts (``--window`` tokens each)
are stored, to keep the repository small.

    python scripts/precompute_features.py [--tokens 250000] [--keep 20] [--window 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tqdm.auto import tqdm  # noqa: E402

from saesteer.config import SaeSpec  # noqa: E402
from saesteer.corpus import iter_bundled, pack_sequences  # noqa: E402
from saesteer.features import compute_many, trim_contexts  # noqa: E402
from saesteer.models import load_model  # noqa: E402
from saesteer.paths import bundled_feature_dir  # noqa: E402
from saesteer.saes import list_bundled, load_sae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=250_000)
    ap.add_argument("--keep", type=int, default=20)
    ap.add_argument("--window", type=int, default=16)
    args = ap.parse_args()
    t0 = time.time()
    lm = load_model()
    saes = [load_sae(SaeSpec(source="bundled", sae_id=e["id"]), lm) for e in list_bundled()]
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int | None) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage))
        bar.n = done
        bar.refresh()

    seqs = pack_sequences(lm.tokenizer, iter_bundled("train"), 128)
    data = compute_many(lm, saes, seqs, n_tokens=args.tokens, progress=progress, corpus_name="bundled:train", use_bundled=False)
    for sae, fd in zip(saes, data):
        out = bundled_feature_dir(lm.name, sae.id)
        trim_contexts(fd, args.keep, args.window).save(out)
        size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
        print(f"{sae.id}: {out} ({size:.1f} MB)", flush=True)
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
