"""Pure DataFrame shaping for the pages: ranking, filtering, paging, threshold shares, demo presets.

A scores table has one row per feature with columns feature, output_score, input_score (NaN when the
feature has too few contexts), density, max_activation, top_tokens (" | "-joined), bottom_tokens,
n_contexts, min_rank, max_prob.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from ..text import TOKEN_SEP, split_tokens

SORT_COLUMNS = ("output_score", "input_score")


def norm_token(token: str) -> str:
    """Token compared across spellings: SentencePiece '▁' and surrounding whitespace dropped, lower case."""
    return token.replace("▁", " ").strip().lower()


def filter_features(table: pd.DataFrame, input_min: float = 0.0, output_min: float = 0.0, search: str = "") -> pd.DataFrame:
    """Rows passing both thresholds (a missing input score passes only a zero input threshold) and whose
    top or bottom logit-lens tokens contain ``search`` (case-insensitive substring)."""
    keep = table["output_score"].fillna(0) >= output_min
    if input_min > 0:
        keep &= table["input_score"].fillna(-1) >= input_min
    query = search.strip().lower()
    if query:
        text = (table["top_tokens"].fillna("").astype(str) + TOKEN_SEP + table["bottom_tokens"].fillna("").astype(str)).str.replace("▁", " ").str.lower()
        keep &= text.str.contains(query, regex=False)
    return table[keep]


def ranked(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Features sorted by ``by`` (descending, missing scores last, ties by feature id), with a 1-based rank."""
    if by not in SORT_COLUMNS:
        raise ValueError(f"sort column must be one of {SORT_COLUMNS}, got {by!r}")
    out = table.sort_values([by, "feature"], ascending=[False, True], na_position="last", kind="stable").reset_index(drop=True)
    out.insert(0, "rank", range(1, len(out) + 1))
    return out


def n_pages(n_rows: int, page_size: int) -> int:
    return max(1, math.ceil(n_rows / page_size))


def page_of(frame: pd.DataFrame, page: int, page_size: int) -> pd.DataFrame:
    """Rows of 1-based ``page`` (clamped to the last page)."""
    page = min(max(1, page), n_pages(len(frame), page_size))
    return frame.iloc[(page - 1) * page_size : page * page_size]


def threshold_shares(frames: Mapping[int, pd.DataFrame], input_min: float, output_min: float) -> pd.DataFrame:
    """Per layer: the share of features with input score ≥ ``input_min``, output score ≥ ``output_min``, both.

    Shares are over all features of the layer (a feature without an input score counts as below).
    """
    rows = []
    for layer in sorted(frames):
        t = frames[layer]
        n = len(t)
        inp = t["input_score"].fillna(-1) >= input_min
        out = t["output_score"].fillna(-1) >= output_min
        rows.append(
            {
                "layer": layer,
                "features": n,
                "with_input_score": int(t["input_score"].notna().sum()),
                "input_share": float(inp.mean()) if n else 0.0,
                "output_share": float(out.mean()) if n else 0.0,
                "both_share": float((inp & out).mean()) if n else 0.0,
                "median_input": float(t["input_score"].median()) if n else float("nan"),
                "median_output": float(t["output_score"].median()) if n else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def zero_input_note(frames: Mapping[int, pd.DataFrame]) -> str | None:
    """A sentence for the layers whose median input score is 0 (None when there is none): how few of their
    scored features have any top context peaking on a token they promote, so what the input ranking rests on."""
    zero = {}
    for layer in sorted(frames):
        scored = frames[layer]["input_score"].dropna()
        if len(scored) and float(scored.median()) == 0.0:
            zero[layer] = float((scored > 0).mean())
    if not zero:
        return None
    names = ", ".join(f"L{l}" for l in zero)
    lo, hi = f"{min(zero.values()):.0%}", f"{max(zero.values()):.0%}"
    share = lo if lo == hi else f"{lo}–{hi}"
    return (f"The median input score at {names} is 0: only {share} of the scored features there have any top context "
            "peaking on a token they promote, so the input-score ranking rests on those few.")


def _word(token: str, min_len: int = 3) -> bool:
    text = norm_token(token)
    return len(text) >= min_len and text.isascii() and text.isalpha()


def lens_family(tokens: list[str], k: int = 10) -> int:
    """How many of the first ``k`` lens tokens spell the first one's word (same first four letters, any case,
    with or without a leading space, plural...). Several spellings of one word mark a clean concept feature;
    a list of unrelated fragments marks a noisy one."""
    if not tokens or not _word(tokens[0], 4):
        return 0
    head = norm_token(tokens[0])[:4]
    return sum(1 for t in tokens[:k] if _word(t, 4) and norm_token(t).startswith(head))


def demo_features(table: pd.DataFrame, n: int = 4, min_family: int = 3) -> pd.DataFrame:
    """Up to ``n`` features for a demonstration: high output score, a top logit-lens token that is a word
    of at least four letters, each with a different word.

    Features whose top lens tokens hold at least ``min_family`` spellings of that word are preferred when
    there are ``n`` of them: their effect reads as one concept rather than as word fragments.
    """
    rows = []
    for rec in table[["feature", "top_tokens"]].itertuples(index=False):
        tokens = split_tokens(rec.top_tokens)
        if tokens and _word(tokens[0], 4):
            rows.append((rec.feature, lens_family(tokens)))
    pool = pd.DataFrame(rows, columns=["feature", "family"])
    if (pool["family"] >= min_family).sum() >= n:
        pool = pool[pool["family"] >= min_family]
    cand = table.merge(pool, on="feature").sort_values(
        ["output_score", "family", "input_score", "feature"], ascending=[False, False, False, True], na_position="last", kind="stable"
    )
    seen: set[str] = set()
    picked = []
    for _, row in cand.iterrows():
        word = norm_token(split_tokens(row["top_tokens"])[0])
        if word in seen:
            continue
        seen.add(word)
        picked.append(row.drop(labels="family"))
        if len(picked) == n:
            break
    return pd.DataFrame(picked).reset_index(drop=True) if picked else table.iloc[0:0]


def selected_feature(event, frame: pd.DataFrame) -> int | None:
    """Feature id of the row selected in a ``st.dataframe`` selection event over ``frame``, if any."""
    try:
        rows = event["selection"]["rows"]
    except (KeyError, TypeError):
        return None
    if not rows or rows[0] >= len(frame):
        return None
    return int(frame.iloc[rows[0]]["feature"])
