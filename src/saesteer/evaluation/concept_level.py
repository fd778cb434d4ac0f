"""Concept-level steering evaluation: SAE features found from the input side (what fires on the concept) or the
output side (what promotes it), picked by activation, by output score, filtered by output score, or at random,
against DiffMean, LoRA, prompting and no steering.

Protocol (Arad, Mueller & Belinkov 2025, with AxBench's held-out strength selection):

1. A *concept* is a word or short phrase; its tokens come from :func:`.candidates.concept_token_ids`. Its
   candidates (:func:`.candidates.concept_candidates`, parameters ``EvalParams.theta``, ``tau``, ``top_k``,
   ``max_contexts``, ``min_contexts``) are the *input-side* ones, features whose top contexts peak on a concept
   token in at least a share theta of them (the offline stand-in for searching explanations, how AxBench
   labelled its SAE features), and the *output-side* ones, whose logit-lens top-k holds a concept token.
2. SAE methods: ``sae_activation`` steers with the activation pick (the input-side candidate of highest firing
   share), ``sae_output`` with the highest output score over both sets, ``sae_filtered`` with *every*
   input-side candidate whose output score is >= tau (the paper's filter; each feature gets its own strength and
   its own rows, and the concept's result is their mean), ``sae_random`` with a seeded random candidate of
   either set. A concept with no candidate at all is skipped (every method, and it does not count towards
   ``n_concepts``); a concept lacking one kind records the methods that need it as skipped, with the reason.
3. The prefixes are split once, seeded, into two halves. On the *train* half every grid method (each SAE
   feature of each method, and DiffMean) is run at every strength (SAE features: paper mode over
   ``config.PAPER_STRENGTHS``; DiffMean: additive over coefficients relative to the residual norm); the strength
   with the best mean combined score is chosen there, and the method (the feature) is reported at that strength
   on the *test* half only. Baselines without a grid (``unsteered``, ``prompt``: "Talk about X." before the
   prefix, ``lora``) are reported on the test half. All generations are greedy. Concepts are taken
   ``EvalParams.concepts_per_batch`` at a time and every phase batches all their rows: one decode call (of at
   most ``batch_size`` rows) for every prefix × strength × feature × method of the group's train half, one for
   its test half (LoRA rows included, each concept's adapter applied to its own rows), one perplexity pass per
   phase. Rows do not interact, so each concept's results are those of running it alone (tested).

Metrics of one generation (the continuation only, never the prefix):

- ``mentions``: number of whole-word, case-insensitive matches of the concept (plural ``s``/``es``
  allowed; see ``baselines.mention_pattern``). ``concept_score`` = 1 if ``mentions`` > 0, else 0. Both
  are defined the same way for every method, so they compare methods.
- ``success_k``: the paper's generation success@k, as a count: how many distinct strings of the target set
  occur in the text as whole words (case-insensitive). For SAE rows the target set is the feature's top-k
  logit-lens tokens plus the concept's tokens; for the other methods, the concept's tokens only. A token's
  string is its decoded text, stripped and lower-cased; strings shorter than 2 characters or without a
  letter or digit are dropped (punctuation would match everywhere).
- ``ppl``: perplexity of the continuation's tokens under the *unsteered* model, conditioned on BOS + the
  neutral prefix (also for ``prompt``, whose instruction is not shown to the scorer); NaN for an empty one.
- ``repetition``: share of repeated word n-grams (n = 2): 1 − distinct / total; 0 below two words.
- ``fluency`` = (1 − repetition) · ppl_factor, ppl_factor = clip((ln P_max − ln ppl) / (ln P_max − ln P_ref),
  0, 1): 1 for text at least as predictable as the unsteered model's own continuations (P_ref, their
  median perplexity in this run), falling linearly in log-perplexity to 0 at P_max = 1000; 0 for empty text.
- ``combined`` = concept_score · fluency, in [0, 1]: the score used to choose strengths and to rank methods.
  On the train half, rows that do not mention the concept have combined = 0 whatever their fluency, so their
  perplexity is not computed (ppl and fluency NaN) unless ``EvalParams.full_train_fluency``.

Results are written incrementally under ``out/units/`` per (concept, method), so an interrupted run resumes;
:func:`load_results` reads a finished or partial run and the ``fig_*`` functions plot it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..baselines import (
    LoraReport,
    add_vector,
    diffmean,
    generated_texts,
    lora_adapter,
    lora_rows,
    mine_sentences,
    residual_mean,
)
from ..config import ConfigError
from ..corpus import Doc
from ..judge import Judge
from ..memory import for_each_batch
from ..models import LoadedModel
from ..saes import LoadedSae
from . import layout
from .candidates import Candidate, ConceptCandidates, FeatureBank, concept_candidates, concept_token_ids
from .layout import default_prefixes, slug
from .metrics import (
    best_strength,
    concept_mentions,
    continuation_nll,
    fluency,
    ppl_factor,
    repetition,
    split_prefixes,
    success_at_k,
    target_strings,
)
from .params import METHODS, PREVIOUS_SAE_METHODS, PROMPT_TEMPLATE, PROTOCOL, SAE_METHODS, EvalParams, Log
from .report import write_report
from .results import EvalResults, load_results


@dataclass
class _Row:
    method: str
    feature: int
    strength: float
    split: str
    prefix_idx: int
    prompt: str
    concept: str = ""


def sae_features(cc: ConceptCandidates) -> dict[str, tuple[Candidate, ...]]:
    """SAE method -> the candidates it steers with; a method that is absent has none (it is skipped)."""
    out = {"sae_activation": (cc.activation_pick,), "sae_output": (cc.output_pick,), "sae_filtered": cc.filtered,
           "sae_random": (cc.random_pick,)}
    return {m: cands for m, cands in out.items() if cands and all(c is not None for c in cands)}


def skip_reason(cc: ConceptCandidates, method: str) -> str:
    """Why ``method`` has no feature to steer with for the concept of ``cc`` (which kind of candidate is missing)."""
    p = cc.params
    no_input = (f"no input-side candidate: no feature has at least {p.min_contexts} top contexts with a share >= "
                f"theta = {p.theta:g} of them peaking on the concept")
    if method == "sae_activation" or (method == "sae_filtered" and not cc.input_side):
        return no_input
    if method == "sae_filtered":
        best = max((c.output_score for c in cc.input_side if math.isfinite(c.output_score)), default=math.nan)
        return (f"no input-side candidate has output score >= tau = {p.tau:g} (the {len(cc.input_side)} input-side "
                f"candidate(s) score at most {best:.3g})")
    if method == "sae_output":
        return "no candidate feature has an output score"
    return "no candidate feature (input- or output-side)"


def _kinds(cc: ConceptCandidates) -> dict:
    """What every unit record of a concept says about its candidates."""
    return {"n_candidates": len(cc.union), **{f"n_{k}": v for k, v in cc.kinds.items()}, "concept_token_ids": list(cc.token_ids)}


def _pick_info(method: str, cands: Sequence[Candidate]) -> dict:
    if method == "sae_filtered":
        return {"n_features": len(cands), "features": [c.feature for c in cands],
                "feature_output_scores": [c.output_score for c in cands], "feature_firing_shares": [c.firing_share for c in cands]}
    c = cands[0]
    return {"feature": c.feature, "output_score": c.output_score, "input_score": c.input_score, "firing_share": c.firing_share,
            "density": c.density, "input_side": c.input_side, "output_side": c.output_side}


class Evaluation:
    """One evaluation run of one SAE layer, writing under ``out`` (see :func:`run_evaluation`)."""

    def __init__(
        self,
        lm: LoadedModel,
        sae: LoadedSae,
        bank: FeatureBank,
        prefixes: Sequence[str],
        out: str | Path,
        params: EvalParams = EvalParams(),
        resume: bool = False,
        docs: Iterable[Doc] | None = None,
        judge: Judge | None = None,
        log: Log | None = None,
    ):
        if len(prefixes) < params.n_prefixes:
            raise ConfigError(f"{len(prefixes)} prefixes given but n_prefixes={params.n_prefixes}: give more prefixes or lower --n-prefixes")
        if bank.top_ids.shape[1] < params.top_k:
            raise ConfigError(f"the feature data has {bank.top_ids.shape[1]} logit-lens tokens per feature, the evaluation needs top_k={params.top_k}")
        self.lm, self.sae, self.bank, self.params = lm, sae, bank, params
        self.prefixes = list(prefixes[: params.n_prefixes])
        self.out = Path(out)
        self.units = self.out / "units"
        self.docs = docs
        self.judge = judge
        self.log = log or (lambda _msg: None)
        self.train, self.test = split_prefixes(len(self.prefixes), params.seed)
        self._nll_cache: dict[tuple[int, str], tuple[float, int]] = {}
        self._batch_size = params.batch_size  # rows per generate call; halved for the rest of the run out of memory
        self._neutral = None
        self._base: pd.DataFrame | None = None
        self._texts: dict[str, dict] | None = None
        self._prepare(resume)

    # -- bookkeeping -------------------------------------------------------------------------------

    def _meta(self) -> dict:
        from ..store import model_fingerprint, sae_fingerprint

        return {
            "experiment": "concepts",
            "protocol": PROTOCOL,
            "model": self.lm.name,
            "model_fingerprint": model_fingerprint(self.lm),
            "sae_id": self.sae.id,
            "sae_fingerprint": sae_fingerprint(self.sae),
            "layer": self.sae.layer,
            "hook_name": self.sae.hook_name,
            "params": self.params.key(),
            "prefixes": self.prefixes,
            "train_prefixes": self.train,
            "test_prefixes": self.test,
            "feature_scores": self.bank.source,
            "judge": getattr(self.judge, "name", None),
        }

    def _prepare(self, resume: bool) -> None:
        meta_path = self.out / "meta.json"
        fresh = self._meta()
        if meta_path.exists() or (self.units.exists() and any(self.units.iterdir())):
            if not resume:
                raise ConfigError(f"{self.out} already holds evaluation results: pass --resume to continue them, or choose another --out")
            old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            if meta_path.exists() and old.get("protocol") != PROTOCOL:
                raise ConfigError(
                    f"cannot resume {self.out}: it holds a run of the previous concept-level protocol (SAE methods "
                    f"{', '.join(PREVIOUS_SAE_METHODS)}, candidates from the logit lens only), which this version reads "
                    "but does not continue; choose another --out for a run of the current protocol")
            same = ("model", "model_fingerprint", "sae_id", "sae_fingerprint", "layer", "prefixes", "feature_scores")
            diff = [k for k in same if old.get(k) != fresh[k]]
            # Units are independent per method, so a resumed run may add or drop methods.
            diff += [f"params.{k}" for k in fresh["params"] if k != "methods" and old.get("params", {}).get(k) != fresh["params"][k]]
            if diff:
                raise ConfigError(f"cannot resume {self.out}: it was run with different {', '.join(diff)}; use the same settings or another --out")
            fresh["ppl_ref"] = old.get("ppl_ref")
        self.units.mkdir(parents=True, exist_ok=True)
        self.meta = fresh
        layout.write_json(meta_path, self.meta)

    def unit_name(self, concept: str, method: str) -> str:
        return f"{slug(concept)}__{method}"

    def done(self, concept: str, method: str) -> bool:
        return layout.unit_done(self.out, self.unit_name(concept, method))

    def _save_unit(self, concept: str, method: str, info: dict, rows: pd.DataFrame | None) -> None:
        layout.save_unit(self.out, self.unit_name(concept, method), {"concept": concept, "method": method, **info}, rows)

    # -- generation ------------------------------------------------------------------------------

    def _generate(self, rows: list[_Row], feats: Sequence[int] = (), vectors: dict[str, torch.Tensor] | None = None,
                  loras: dict[str, LoraReport] | None = None) -> tuple[list[str], float, int]:
        """Continuations of ``rows`` in calls of at most ``batch_size`` rows. A row of an SAE method steers (paper
        mode) with its own feature at its strength and 0 for the others; a DiffMean row adds ``strength ·
        vectors[row.concept]`` at every position; a LoRA row runs with the adapter ``loras[row.concept]`` on its
        row only (``baselines.lora_rows``); any other row is unsteered. Mixing them (and concepts) in one call
        is exact: a zero strength or coefficient leaves its row unchanged, rows do not interact, and larger
        batches decode faster per token. Rows that would decode the same thing (two methods or concepts that
        picked the same feature) are decoded once."""
        from ..steering import generate

        def key(r: _Row) -> tuple:
            if r.method in SAE_METHODS:
                return ("sae", r.feature, r.strength, r.prompt)
            if r.method in ("diffmean", "lora"):
                return (r.method, r.concept, r.strength, r.prompt)
            return ("plain", r.prompt)

        unique = list(dict.fromkeys(key(r) for r in rows))
        feats = list(feats)
        sae_rows = torch.zeros(len(unique), len(feats))
        vec_rows = torch.zeros(len(unique), self.lm.d_model)
        for i, k in enumerate(unique):
            if k[0] == "sae":
                sae_rows[i, feats.index(k[1])] = k[2]
            elif k[0] == "diffmean":
                vec_rows[i] = k[2] * vectors[k[1]].float().cpu()
        texts: list[str] = [""] * len(unique)
        t0 = time.perf_counter()
        common = {"max_new_tokens": self.params.max_new_tokens, "temperature": 0.0, "seed": self.params.seed}

        def step(s: int, e: int) -> None:
            prompts = [k[-1] for k in unique[s:e]]
            steer = {"sae": self.sae, "features": feats, "strengths": sae_rows[s:e], "mode": "paper"} if feats else {}
            adapters: dict[str, list[int]] = {}
            for j, k in enumerate(unique[s:e]):
                if k[0] == "lora":
                    adapters.setdefault(k[1], []).append(j)
            with ExitStack() as stack:
                if bool(vec_rows[s:e].any()):
                    stack.enter_context(add_vector(self.lm, self.sae.layer, vec_rows[s:e], torch.ones(e - s)))
                if adapters:
                    stack.enter_context(lora_rows(self.lm, [(loras[c], idx) for c, idx in adapters.items()]))
                texts[s:e] = generate(self.lm, prompts, **steer, **common)

        # Calls of equal size (600 rows at 512 a call: 300 + 300, not 512 + a slow 88). Out of memory, the
        # batch is halved for the rest of the run (greedy rows do not depend on their batch).
        n = len(unique)
        even = -(-n // -(-n // self._batch_size)) if n else self._batch_size
        used = for_each_batch(n, even, step, "prompts")
        self._batch_size = min(self._batch_size, used) if used < even else self._batch_size
        by_key = dict(zip(unique, texts))
        return [by_key[key(r)] for r in rows], time.perf_counter() - t0, n * self.params.max_new_tokens

    def _nll(self, prefix_idx: Sequence[int], texts: Sequence[str]) -> list[tuple[float, int]]:
        """(mean NLL, tokens) per text, each distinct (prefix, text) scored once per run."""
        keys = list(zip(prefix_idx, texts))
        todo = list(dict.fromkeys(k for k in keys if k not in self._nll_cache))
        if todo:
            nll, count = continuation_nll(self.lm, [self.prefixes[i] for i, _ in todo], [t for _, t in todo])
            for k, v, c in zip(todo, nll, count):
                self._nll_cache[k] = (float(v), int(c))
        return [self._nll_cache[k] for k in keys]

    def _unsteered(self) -> pd.DataFrame:
        """Unsteered continuations of every prefix (concept-independent, so generated once per run)."""
        if self._base is not None:
            return self._base
        path = self.units / "_unsteered.parquet"
        if path.exists():
            frame = pd.read_parquet(path)
        else:
            texts, secs, steps = self._generate([_Row("unsteered", -1, 0.0, "", i, p) for i, p in enumerate(self.prefixes)])
            frame = pd.DataFrame({"prefix_idx": range(len(self.prefixes)), "text": texts})
            frame["gen_seconds"], frame["row_steps"] = secs, steps
            layout.write_parquet(path, frame)
        nll = self._nll([int(i) for i in frame["prefix_idx"]], list(frame["text"]))
        if self.meta.get("ppl_ref") is None:
            ppl = [math.exp(v) for v, n in nll if n]
            self.meta["ppl_ref"] = float(np.median(ppl)) if ppl else 1.0
            layout.write_json(self.out / "meta.json", self.meta)
        self._base = frame
        return frame

    # -- concept texts --------------------------------------------------------------------------

    def _concept_texts(self, concepts: Sequence[str]) -> dict[str, dict]:
        """Concept sentences (mined once per run for all concepts, cached in concept_texts.json) and neutral ones."""
        if self._texts is not None:
            return self._texts
        path = self.out / "concept_texts.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        need = [c for c in concepts if c not in stored.get("concepts", {})]
        if need or "neutral" not in stored:
            from ..corpus import iter_bundled

            self.log(f"mining concept sentences for {len(need)} concept(s) from the corpus")
            docs = self.docs if self.docs is not None else iter_bundled("train")
            mined = mine_sentences(need, docs, self.params.n_concept_texts, self.params.n_neutral_texts, self.params.seed)
            stored.setdefault("concepts", {})
            for c in need:
                stored["concepts"][c] = {"texts": mined.positive[c], "n_corpus": len(mined.positive[c]), "n_generated": 0}
            stored.setdefault("neutral", mined.neutral)
            layout.write_json(path, stored)
        self._texts = stored
        return stored

    def _texts_for(self, concept: str) -> dict:
        stored = self._concept_texts([concept])
        entry = stored["concepts"][concept]
        short = self.params.min_concept_texts - entry["n_corpus"]
        if short > 0 and entry["n_generated"] == 0:
            self.log(f"{concept}: {entry['n_corpus']} corpus sentences; generating {short} more")
            gen = generated_texts(self.lm, concept, self.prefixes, short, seed=self.params.seed, max_new_tokens=32)
            entry["texts"] = entry["texts"] + gen
            entry["n_generated"] = len(gen)
            layout.write_json(self.out / "concept_texts.json", stored)
        return entry

    def _neutral_mean(self):
        if self._neutral is None:
            neutral = self._concept_texts([])["neutral"]
            if not neutral:
                raise ConfigError("the corpus gave no neutral sentences for DiffMean")
            self._neutral = residual_mean(self.lm, self.sae.layer, neutral)
        return self._neutral

    # -- scoring --------------------------------------------------------------------------------

    def _targets(self, concept: str, token_ids: Sequence[int], feature: int) -> list[str]:
        tok = self.lm.tokenizer
        ids = list(token_ids)
        if feature >= 0:
            ids += [int(t) for t in self.bank.top_ids[self.bank.row(feature), : self.params.top_k]]
        return target_strings(tok.batch_decode([[i] for i in ids]))

    def _score(self, concept: str, token_ids: Sequence[int], rows: list[_Row], texts: list[str]) -> pd.DataFrame:
        mentions = [concept_mentions(t, concept) for t in texts]
        sel = [i for i, (r, m) in enumerate(zip(rows, mentions)) if self._needs_fluency(r, m)]
        nll = dict(zip(sel, self._nll([rows[i].prefix_idx for i in sel], [texts[i] for i in sel])))
        targets: dict[int, list[str]] = {}
        ref = self.meta["ppl_ref"]
        out = []
        for i, (r, text, m) in enumerate(zip(rows, texts, mentions)):
            if r.feature not in targets:
                targets[r.feature] = self._targets(concept, token_ids, r.feature)
            rep = repetition(text, self.params.rep_n)
            cs = float(m > 0)
            if i in nll:
                v, n_tok = nll[i]
                ppl = math.exp(v) if n_tok else math.nan
                flu = fluency(rep, ppl_factor(ppl, ref, self.params.ppl_max)) if n_tok else 0.0
                comb = cs * flu
            else:
                n_tok = len(self.lm.tokenizer(text, add_special_tokens=False).input_ids) if text else 0
                ppl, flu, comb = math.nan, math.nan, 0.0
            out.append({
                "concept": concept, "method": r.method, "feature": r.feature, "strength": float(r.strength),
                "split": r.split, "prefix_idx": r.prefix_idx, "prefix": self.prefixes[r.prefix_idx], "prompt": r.prompt,
                "text": text, "n_tokens": n_tok, "mentions": m, "concept_score": cs,
                "success_k": success_at_k(text, targets[r.feature]), "ppl": ppl, "repetition": rep,
                "fluency": flu, "combined": comb,
            })
        return pd.DataFrame(out)

    def _judge(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.judge is None or frame.empty:
            return frame
        scores = [self.judge.rate(c, p, t) for c, p, t in zip(frame["concept"], frame["prefix"], frame["text"])]
        frame = frame.copy()
        frame["judge_concept"] = [s.concept for s in scores]
        frame["judge_instruction"] = [s.instruction for s in scores]
        frame["judge_fluency"] = [s.fluency for s in scores]
        frame["judge_score"] = [s.score for s in scores]
        return frame

    # -- one concept ----------------------------------------------------------------------------

    def _needs_fluency(self, row: _Row, mentions: int) -> bool:
        # A train row that does not mention the concept has combined score 0 whatever its fluency, so its
        # perplexity (a forward pass about as costly as generating the row) is skipped unless asked for.
        return self.params.full_train_fluency or row.split != "train" or mentions > 0

    def _prefetch_nll(self, rows: list[_Row], texts: list[str]) -> None:
        """Score, in one batched pass, the perplexities that :meth:`_score` will need for these rows (of any
        concepts); results go to the per-run cache, so the per-concept scoring then only looks them up."""
        need = [(r.prefix_idx, t) for r, t in zip(rows, texts) if self._needs_fluency(r, concept_mentions(t, r.concept))]
        if need:
            self._nll([i for i, _ in need], [t for _, t in need])

    def run_group(self, items: Sequence[tuple[ConceptCandidates, Sequence[str]]]) -> dict:
        """Run the pending methods of a group of concepts ((candidates, methods) each) with their rows batched
        together, phase by phase: one decode call (or a few of ``batch_size`` rows) for every train row of
        every concept, one for every test row, one perplexity pass per phase; LoRA apart (its adapter changes
        the whole model, so each concept's adapter is trained alone). Rows never interact, so each concept's
        results are those of running it alone. Returns the group's timing record."""
        p = self.params
        t_start = time.perf_counter()
        timing = {"concepts": [cc.concept for cc, _ in items], "gen_seconds": 0.0, "row_steps": 0, "lora_seconds": 0.0}

        def gen(rows: list[_Row], **kw) -> list[str]:
            texts, secs, steps = self._generate(rows, **kw)
            timing["gen_seconds"] += secs
            timing["row_steps"] += steps
            return texts

        frames: dict[str, dict[str, list[pd.DataFrame]]] = {}
        info: dict[str, dict[str, dict]] = {}
        plan: dict[str, dict[str, list[int]]] = {}  # concept -> SAE method -> the features it steers with
        vectors: dict[str, torch.Tensor] = {}
        feats: list[int] = []
        train_rows: list[_Row] = []
        for cc, methods in items:
            c = cc.concept
            frames[c] = {m: [] for m in methods}
            info[c] = {m: {"status": "done", **_kinds(cc)} for m in methods}
            picks = sae_features(cc)
            plan[c] = {m: [x.feature for x in picks[m]] for m in methods if m in SAE_METHODS}
            for m, fs in plan[c].items():
                feats += fs  # two methods (or concepts) may steer with the same feature: decoded once
                info[c][m].update(_pick_info(m, picks[m]))
            if "diffmean" in methods:
                entry = self._texts_for(c)
                dm = diffmean(residual_mean(self.lm, self.sae.layer, entry["texts"]), self._neutral_mean())
                info[c]["diffmean"].update(n_corpus_texts=entry["n_corpus"], n_generated_texts=entry["n_generated"], diffmean_norm=dm.raw_norm, resid_norm=dm.resid_norm)
                vectors[c] = dm.vector(1.0)
                train_rows += [_Row("diffmean", -1, k, "train", i, self.prefixes[i], c) for k in p.diffmean_coeffs for i in self.train]
            # Train half: every feature of every grid method at every strength.
            train_rows += [_Row(m, f, s, "train", i, self.prefixes[i], c) for m, fs in plan[c].items() for f in fs for s in p.strengths for i in self.train]
        feats = list(dict.fromkeys(feats))

        def by_concept(rows: list[_Row], texts: list[str]) -> dict[str, tuple[list[_Row], list[str]]]:
            out: dict[str, tuple[list[_Row], list[str]]] = {}
            for r, t in zip(rows, texts):
                rs, ts = out.setdefault(r.concept, ([], []))
                rs.append(r)
                ts.append(t)
            return out

        # (method, feature) -> the strength chosen on the train half; DiffMean's feature is -1
        best: dict[str, dict[tuple[str, int], float]] = {cc.concept: {} for cc, _ in items}
        if train_rows:
            texts = gen(train_rows, feats=feats, vectors=vectors)
            self._prefetch_nll(train_rows, texts)
            trains = by_concept(train_rows, texts)
            for cc, _ in items:
                part = trains.get(cc.concept)
                if part is None:
                    continue
                frame = self._score(cc.concept, cc.token_ids, *part)
                for m in frame["method"].unique():
                    frames[cc.concept][m].append(frame[frame["method"] == m])
                for (m, f), rows in frame.groupby(["method", "feature"], sort=False):
                    best[cc.concept][(m, int(f))] = best_strength(rows)

        # Test half: every method (every feature) at its chosen strength.
        test_rows: list[_Row] = []
        for cc, methods in items:
            c = cc.concept
            test_rows += [_Row(m, f, best[c][(m, f)], "test", i, self.prefixes[i], c) for m, fs in plan[c].items() for f in fs for i in self.test]
            if "diffmean" in methods:
                test_rows += [_Row("diffmean", -1, best[c][("diffmean", -1)], "test", i, self.prefixes[i], c) for i in self.test]
            if "prompt" in methods:
                test_rows += [_Row("prompt", -1, 0.0, "test", i, PROMPT_TEMPLATE.format(concept=c, prefix=self.prefixes[i]), c) for i in self.test]
        # LoRA: each concept's adapter is trained alone; its rows then decode in the same call as the other test
        # rows, with the adapter applied to those rows only.
        loras: dict[str, LoraReport] = {}
        for cc, methods in items:
            if "lora" not in methods:
                continue
            c = cc.concept
            entry = self._texts_for(c)
            t0 = time.perf_counter()
            with lora_adapter(self.lm, self.sae.layer, entry["texts"], p.lora, seed=p.seed) as report:
                loras[c] = report
            timing["lora_seconds"] += time.perf_counter() - t0
            info[c]["lora"].update(n_corpus_texts=entry["n_corpus"], n_generated_texts=entry["n_generated"], lora_losses=report.losses, lora_params=report.n_params)
            test_rows += [_Row("lora", -1, 1.0, "test", i, self.prefixes[i], c) for i in self.test]
        test_texts = gen(test_rows, feats=feats, vectors=vectors, loras=loras) if test_rows else []
        base = self._unsteered().set_index("prefix_idx")["text"] if any("unsteered" in m for _, m in items) else None
        self._prefetch_nll(test_rows, test_texts)
        tests = by_concept(test_rows, test_texts)

        for cc, methods in items:
            c = cc.concept
            test_frames = [self._score(c, cc.token_ids, *tests[c])] if c in tests else []
            if base is not None and "unsteered" in methods:
                for split, idx in (("train", self.train), ("test", self.test)):
                    rows = [_Row("unsteered", -1, 0.0, split, i, self.prefixes[i], c) for i in idx]
                    (test_frames if split == "test" else frames[c]["unsteered"]).append(self._score(c, cc.token_ids, rows, [base[i] for i in idx]))
            test = self._judge(pd.concat(test_frames, ignore_index=True)) if test_frames else pd.DataFrame()
            for m in methods:
                part = test[test["method"] == m] if not test.empty else test
                rows_m = pd.concat([*frames[c][m], part], ignore_index=True)
                if m == "sae_filtered":
                    info[c][m]["best_strengths"] = [best[c][(m, f)] for f in plan[c][m]]
                elif m in plan[c] or m == "diffmean":
                    info[c][m]["best_strength"] = best[c][(m, plan[c][m][0] if m in plan[c] else -1)]
                elif not part.empty:
                    info[c][m]["best_strength"] = float(part["strength"].iloc[0])
                self._save_unit(c, m, info[c][m], rows_m)
        timing["concept"] = ", ".join(timing["concepts"])
        timing["seconds"] = time.perf_counter() - t_start
        layout.append_timing(self.out, timing)
        return timing

    # -- all concepts ---------------------------------------------------------------------------

    def _run_logged(self, group: Sequence[tuple[ConceptCandidates, Sequence[str]]]) -> None:
        t = self.run_group(group)
        rate = t["row_steps"] / t["gen_seconds"] if t["gen_seconds"] else float("nan")
        what = "; ".join(f"{cc.concept} ({len(cc.input_side)} input-side, {len(cc.output_side)} output-side, "
                         f"{len(cc.filtered)} filtered): {', '.join(m)}" for cc, m in group)
        self.log(f"{what} done in {t['seconds']:.0f}s ({rate:.0f} decoded tokens/s)")

    def run(self, concepts: Sequence[str], n_concepts: int | None = None) -> None:
        """Evaluate concepts in order until ``n_concepts`` have candidates (skipped ones are recorded too)."""
        methods = [m for m in METHODS if m in self.params.methods]
        # What this run is to cover, so that a reader of a partial run can tell how far it got.
        self.meta["run"] = {"concepts": list(concepts), "n_concepts": n_concepts, "methods": methods}
        self.meta.pop("finished", None)
        layout.write_json(self.out / "meta.json", self.meta)
        if not self.bank.peak_ids.shape[1]:
            self.log("the feature data has no top contexts: no concept can have input-side candidates")
        self._unsteered()
        if {"diffmean", "lora"} & set(methods):
            self._concept_texts(concepts)  # one corpus pass for every concept
        cparams = self.params.candidate_params()
        evaluated = 0
        group: list[tuple[ConceptCandidates, list[str]]] = []
        for concept in concepts:
            if n_concepts is not None and evaluated >= n_concepts:
                break
            ids = concept_token_ids(self.lm.tokenizer, concept)
            cc = concept_candidates(concept, ids, self.bank, cparams)
            if not cc.union:
                reason = ("no candidate feature: none fires on the concept and none has it among its top-"
                          f"{cparams.top_k} logit-lens tokens") if ids else "the concept is not a single token of this tokenizer"
                for m in methods:
                    if not self.done(concept, m):
                        self._save_unit(concept, m, {"status": "skipped", "reason": reason, **_kinds(cc)}, None)
                self.log(f"{concept}: skipped ({reason})")
                continue
            evaluated += 1
            picks = sae_features(cc)
            for m in methods:
                if m in SAE_METHODS and m not in picks and not self.done(concept, m):
                    self._save_unit(concept, m, {"status": "skipped", "reason": skip_reason(cc, m), **_kinds(cc)}, None)
            pending = [m for m in methods if not self.done(concept, m)]
            if not pending:
                self.log(f"{concept}: already done")
                continue
            group.append((cc, pending))
            if len(group) == self.params.concepts_per_batch:
                self._run_logged(group)
                group = []
        if group:
            self._run_logged(group)
        self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        layout.write_json(self.out / "meta.json", self.meta)


def run_evaluation(
    lm: LoadedModel,
    sae: LoadedSae,
    bank: FeatureBank,
    concepts: Sequence[str],
    out: str | Path,
    params: EvalParams = EvalParams(),
    prefixes: Sequence[str] | None = None,
    n_concepts: int | None = None,
    resume: bool = False,
    docs: Iterable[Doc] | None = None,
    judge: Judge | None = None,
    log: Log | None = None,
) -> EvalResults:
    """Run (or resume) the evaluation, write the tables and plots under ``out``, and return the results.
    ``bank`` holds the SAE's feature scores, logit lens and top contexts (:meth:`FeatureBank.from_feature_data`).

    ``docs`` is the corpus concept sentences are mined from (default: the bundled train split); ``judge`` an
    optional ``judge.Judge`` applied to the reported (test-half) generations.
    """
    ev = Evaluation(lm, sae, bank, prefixes if prefixes is not None else default_prefixes(), out, params, resume, docs, judge, log)
    ev.run(concepts, n_concepts)
    results = load_results(out)
    write_report(results, out)
    return results
