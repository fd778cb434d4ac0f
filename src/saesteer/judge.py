"""Optional LLM judge with the AxBench rubric: concept, instruction and fluency, each rated 0–2.

The overall score is the harmonic mean of the three ratings (0 as soon as one of them is 0), as in AxBench.
Off by default; configured by environment variables and turned on with ``eval --judge``:

- ``SAESTEER_JUDGE_URL``: base URL of an OpenAI-compatible server (``.../v1``; ``/chat/completions`` is
  appended), with ``SAESTEER_JUDGE_MODEL`` (model name, required) and optionally ``SAESTEER_JUDGE_API_KEY``;
- or ``SAESTEER_JUDGE_LOCAL``: a model ``models.load_model`` can load offline (a local directory or
  ``gemma-3-270m``), run greedily with its chat template when it has one.

Replies are parsed for ``Rating: [[N]]``; a reply without a rating counts as missing (NaN), never as 0.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from .config import ConfigError
from .paths import JUDGE_API_KEY_ENV, JUDGE_LOCAL_ENV, JUDGE_MODEL_ENV, JUDGE_URL_ENV

Complete = Callable[[str], str]

_FORMAT = 'Provide your rating using this exact format: "Rating: [[score]]".'

RUBRICS = {
    "concept": (
        "Please act as an impartial judge and evaluate whether the specified concept is presented in the sentence "
        "fragment provided below. Focus solely on whether the concept is clearly incorporated, without regard for "
        "grammar or logical coherence.\n\nBegin your evaluation by providing a short explanation of whether the "
        "concept is clearly incorporated. Point out references to the concept in the fragment, noting any minimal "
        "or awkward incorporations. After providing your explanation, rate the concept's relevance on a scale from "
        "0 to 2, where 0 indicates the concept is not present at all, 1 indicates the concept is somewhat present "
        "but minimally or awkwardly incorporated, and 2 indicates the concept is more fully and effectively "
        "incorporated, with stronger and more natural integration. " + _FORMAT + "\n\n"
        "[Concept Start]\n{concept}\n[Concept End]\n\n[Sentence Fragment Start]\n{text}\n[Sentence Fragment End]"
    ),
    "instruction": (
        "Please act as an impartial judge and evaluate whether the sentence fragment provided below is related to "
        "the instruction. Focus solely on the degree of relatedness in terms of topic, regardless of grammar, "
        "coherence, or informativeness.\n\nBegin your evaluation by providing a brief explanation of whether the "
        "sentence is related to the instruction, and point out references related to the instruction. After "
        "providing your explanation, rate the instruction relevance on a scale from 0 to 2, where 0 indicates the "
        "sentence is unrelated to the instruction, 1 indicates it is somewhat related but only minimally or "
        "indirectly relevant in terms of topic, and 2 indicates it is more clearly and directly related to the "
        "instruction. " + _FORMAT + "\n\n"
        "[Instruction Start]\n{instruction}\n[Instruction End]\n\n[Sentence Fragment Start]\n{text}\n[Sentence Fragment End]"
    ),
    "fluency": (
        "Please act as an impartial judge and evaluate the fluency of the sentence fragment provided below. Focus "
        "solely on fluency, disregarding its completeness, relevance, coherence with any broader context, or "
        "informativeness.\n\nBegin your evaluation by briefly describing the fluency of the sentence, noting any "
        "unnatural phrasing, awkward transitions, grammatical errors, or repetitive structures that may hinder "
        "readability. After providing your explanation, rate the sentence's fluency on a scale from 0 to 2, where "
        "0 indicates the sentence is not fluent and highly unnatural (e.g., incomprehensible or repetitive), 1 "
        "indicates it is somewhat fluent but contains noticeable errors or awkward phrasing, and 2 indicates the "
        "sentence is fluent and almost perfect. " + _FORMAT + "\n\n"
        "[Sentence Fragment Start]\n{text}\n[Sentence Fragment End]"
    ),
}

_RATING = re.compile(r"Rating:\s*\[\[\s*([0-2](?:\.\d+)?)\s*\]\]", re.IGNORECASE)


def parse_rating(reply: str) -> float:
    """The last ``Rating: [[N]]`` (N in 0..2) in ``reply``; NaN when there is none."""
    found = _RATING.findall(reply or "")
    return float(found[-1]) if found else math.nan


def harmonic_mean(values: tuple[float, ...] | list[float]) -> float:
    """Harmonic mean of ratings; 0 if any rating is 0, NaN if any is missing."""
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


@dataclass(frozen=True)
class JudgeScores:
    concept: float
    instruction: float
    fluency: float

    @property
    def score(self) -> float:
        return harmonic_mean([self.concept, self.instruction, self.fluency])


class Judge:
    """Rates continuations with the AxBench rubric through ``complete`` (prompt -> reply text)."""

    def __init__(self, complete: Complete, name: str):
        self.complete = complete
        self.name = name

    def rate(self, concept: str, instruction: str, text: str) -> JudgeScores:
        """``instruction`` is what the text answers: here the neutral prefix it continues."""
        r = {
            key: parse_rating(self.complete(tpl.format(concept=concept, instruction=instruction, text=text)))
            for key, tpl in RUBRICS.items()
        }
        return JudgeScores(r["concept"], r["instruction"], r["fluency"])


def openai_complete(url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> Complete:
    """A ``complete`` function for an OpenAI-compatible ``/chat/completions`` endpoint (temperature 0)."""
    endpoint = url.rstrip("/") + "/chat/completions"

    def complete(prompt: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0, "max_tokens": 256})
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        req = urllib.request.Request(endpoint, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = json.loads(resp.read().decode())
        except OSError as exc:
            raise RuntimeError(f"the judge endpoint {endpoint} did not answer ({exc.__class__.__name__}: {exc})") from exc
        return str(data["choices"][0]["message"]["content"])

    return complete


def local_complete(lm, max_new_tokens: int = 128) -> Complete:
    """A ``complete`` function that runs a loaded local model greedily (chat template when it has one)."""
    from .steering import generate

    tok = lm.tokenizer

    def complete(prompt: str) -> str:
        text = prompt
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            bos = tok.bos_token or ""
            if bos and text.startswith(bos):  # generate adds BOS itself
                text = text[len(bos):]
        return generate(lm, [text], max_new_tokens=max_new_tokens)[0]

    return complete


def judge_from_env(env: dict[str, str] | None = None) -> Judge:
    """The judge the environment configures; raises ConfigError naming the variables when none is."""
    env = dict(os.environ if env is None else env)
    url, local = env.get(JUDGE_URL_ENV), env.get(JUDGE_LOCAL_ENV)
    if url:
        model = env.get(JUDGE_MODEL_ENV)
        if not model:
            raise ConfigError(f"{JUDGE_URL_ENV} is set but {JUDGE_MODEL_ENV} is not: name the judge model")
        return Judge(openai_complete(url, model, env.get(JUDGE_API_KEY_ENV)), f"{model}@{url}")
    if local:
        from .config import ModelSpec
        from .models import load_model

        return Judge(local_complete(load_model(ModelSpec(name=local))), local)
    raise ConfigError(
        f"the LLM judge is not configured: set {JUDGE_URL_ENV} and {JUDGE_MODEL_ENV} (an OpenAI-compatible "
        f"server) or {JUDGE_LOCAL_ENV} (a local model directory)"
    )
