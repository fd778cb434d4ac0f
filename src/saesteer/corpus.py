"""Text sources: the bundled offline corpus, local files, and (online) Hugging Face datasets.

Every source yields :class:`Doc` objects. ``split`` is "train" or "heldout"; the held-out split of the
bundled corpus is never used to train the bundled SAEs, and their quality metrics are measured on it.

The bundled corpus (``assets/corpus/prose.jsonl.xz``) is built once by :func:`build_offline_corpus` from
English text that Debian packages install (dictionaries with their literary quotations, WordNet glosses,
computing glossaries, the Python documentation); ``assets/corpus/README.md`` records provenance and licences.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .paths import BUNDLED_CORPUS

HELDOUT_PERCENT = 5


@dataclass(frozen=True)
class Doc:
    text: str
    source: str
    split: str = "train"


class CorpusError(ValueError):
    """A text source could not be read; the message names the source and what is accepted."""


def doc_split(text: str) -> str:
    """Deterministic train/held-out assignment from the text's hash (stable across machines)."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def iter_bundled(split: str | None = None, path: Path = BUNDLED_CORPUS) -> Iterator[Doc]:
    """The shipped offline corpus, optionally one split only."""
    if not path.exists():
        raise CorpusError(f"bundled corpus {path} is missing; rebuild it with `python -m saesteer build-corpus`")
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            doc = Doc(row["text"], row["source"], row.get("split") or doc_split(row["text"]))
            if split is None or doc.split == split:
                yield doc


def iter_files(paths: Iterable[str | Path], text_column: str = "text") -> Iterator[Doc]:
    """Local .txt (blank-line separated paragraphs grouped into documents), .jsonl and .parquet files."""
    for p in map(Path, paths):
        if not p.exists():
            raise CorpusError(f"corpus file {p} does not exist")
        suffix = "".join(p.suffixes[-2:]) if p.suffix in {".gz", ".xz"} else p.suffix
        opener = {".gz": gzip.open, ".xz": lzma.open}.get(p.suffix, open)
        if suffix.startswith(".txt"):
            with opener(p, "rt", encoding="utf-8") as fh:
                for chunk in _group_paragraphs(re.split(r"\n\s*\n", fh.read())):
                    yield Doc(chunk, p.name, doc_split(chunk))
        elif suffix.startswith(".jsonl"):
            with opener(p, "rt", encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        row = json.loads(line)
                        if text_column not in row:
                            raise CorpusError(f"{p}:{i + 1} has no '{text_column}' field")
                        yield Doc(row[text_column], p.name, doc_split(row[text_column]))
        elif suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(p)
            if text_column not in frame.columns:
                raise CorpusError(f"{p} has no column '{text_column}' (columns: {list(frame.columns)})")
            for text in frame[text_column].astype(str):
                yield Doc(text, p.name, doc_split(text))
        else:
            raise CorpusError(f"unsupported corpus file {p}: use .txt, .jsonl or .parquet (optionally .gz/.xz)")


def iter_hf_dataset(name: str, split: str = "train", text_column: str = "text", config: str | None = None) -> Iterator[Doc]:
    """A Hugging Face dataset, streamed (needs network)."""
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split, streaming=True)
        for row in ds:
            yield Doc(row[text_column], name, doc_split(row[text_column]))
    except (ConnectionError, OSError) as exc:
        raise CorpusError(
            f"could not stream dataset '{name}' from the Hugging Face hub ({exc.__class__.__name__}: {exc}). "
            "Offline, use the bundled corpus (--corpus bundled) or local files (--corpus path/to/file.txt)."
        ) from exc


def open_source(spec: str, split: str | None = "train") -> Iterator[Doc]:
    """Resolve a corpus spec: 'bundled', a local file path (comma-separated for several), or 'hf:NAME'."""
    if spec == "bundled":
        return iter_bundled(split)
    if spec.startswith("hf:"):
        return iter_hf_dataset(spec[3:])
    paths = [s for s in spec.split(",") if s]
    if not paths:
        raise CorpusError("empty corpus spec: use 'bundled', 'hf:NAME' or file paths")
    docs = iter_files(paths)
    return (d for d in docs if split is None or d.split == split)


def pack_sequences(tokenizer, docs: Iterable[Doc], context_size: int) -> Iterator[list[int]]:
    """Documents tokenised, joined by a blank line and cut into BOS + (context_size - 1) token sequences."""
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    body = context_size - 1
    buf: list[int] = []
    for doc in docs:
        buf.extend(tokenizer(doc.text, add_special_tokens=False).input_ids)
        buf.extend(sep)
        while len(buf) >= body:
            yield [tokenizer.bos_token_id, *buf[:body]]
            buf = buf[body:]


def corpus_hash(path: Path = BUNDLED_CORPUS) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Building the bundled corpus from text installed by Debian packages.

def _group_paragraphs(paragraphs: Iterable[str], target_chars: int = 1600) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    for para in paragraphs:
        para = re.sub(r"\s+", " ", para).strip()
        if not para:
            continue
        buf.append(para)
        size += len(para)
        if size >= target_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def _dictd_entries(path: Path) -> Iterator[str]:
    """Raw entries of a dictd .dict.dz file, split on its index offsets."""
    index = path.with_suffix("").with_suffix(".index")
    data = gzip.open(path).read()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def dec(s: str) -> int:
        v = 0
        for ch in s:
            v = v * 64 + b64.index(ch)
        return v

    seen = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database"):
            continue
        off, ln = dec(parts[1]), dec(parts[2])
        if off in seen:
            continue
        seen.add(off)
        yield data[off : off + ln].decode("utf-8", errors="replace")


def _clean_dict_entry(raw: str) -> str:
    text = re.sub(r"\[1913 Webster\]|\[PJC\]|\[WordNet 1\.5\]|\[Webster 1913 Suppl\.\]|\[[A-Z]{2,3}\]", " ", raw)
    text = re.sub(r"\\[^\\\n]{0,60}\\", " ", text)  # pronunciation \Af*fat"u*ate\
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"--\s*([A-Z][\w.]*)", r"(\1)", text)  # quotation attributions
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n", text)
    return re.sub(r"\s+", " ", text).strip()


def _dict_docs(path: Path, source: str, target_chars: int) -> Iterator[Doc]:
    entries = (_clean_dict_entry(e) for e in _dictd_entries(path))
    for chunk in _group_paragraphs((e for e in entries if len(e) > 40), target_chars):
        yield Doc(chunk, source, doc_split(chunk))


def _wordnet_docs(root: Path) -> Iterator[Doc]:
    """Glosses and example sentences of WordNet synsets, grouped by lexicographer file (a topic: food, animal...)."""
    lexnames = {}
    names_file = root / "lexnames"
    if names_file.exists():
        for line in names_file.read_text().splitlines():
            num, name, _ = line.split()
            lexnames[int(num)] = name
    for pos in ("noun", "verb", "adj", "adv"):
        by_topic: dict[int, list[str]] = {}
        for line in (root / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            lex = int(fields[1])
            n_words = int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            gloss = gloss.strip().replace('"', "")
            by_topic.setdefault(lex, []).append(f"{', '.join(words[:3])}: {gloss}.")
        for lex, items in by_topic.items():
            topic = lexnames.get(lex, str(lex))
            for chunk in _group_paragraphs(items, 1400):
                yield Doc(chunk.replace("\n\n", " "), f"wordnet/{topic}", doc_split(chunk))


def _rst_prose(text: str) -> list[str]:
    """Prose paragraphs of a reStructuredText source (code blocks, directives and tables dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines:
            continue
        first = lines[0]
        if first.startswith((" ", "\t", ".. ", ">>>", "+", "=", "-", "*", "|")) or "::" in first[-3:]:
            continue
        if len(para) < 80:
            continue
        para = re.sub(r":\w+:`~?([^`]+)`", r"\1", para)
        para = re.sub(r"`+([^`]+?)`+_?", r"\1", para)
        out.append(para)
    return out


def _python_doc_docs(root: Path) -> Iterator[Doc]:
    for path in sorted(root.rglob("*.rst.txt")):
        paras = _rst_prose(path.read_text(encoding="utf-8", errors="replace"))
        for chunk in _group_paragraphs(paras):
            yield Doc(chunk, f"python-docs/{path.relative_to(root).parts[0]}", doc_split(chunk))


#: Where each source lives once its Debian package is installed, and how many characters to take at most.
DEBIAN_SOURCES = {
    "gcide": ("dict-gcide", Path("/usr/share/dictd/gcide.dict.dz"), 5_200_000),
    "wordnet": ("wordnet-base", Path("/usr/share/wordnet"), 2_600_000),
    "python-docs": ("python3.11-doc", Path("/usr/share/doc/python3.11-doc/html/_sources"), 1_700_000),
    "foldoc": ("dict-foldoc", Path("/usr/share/dictd/foldoc.dict.dz"), 900_000),
    "jargon": ("dict-jargon", Path("/usr/share/dictd/jargon.dict.dz"), 500_000),
    "devil": ("dict-devil", Path("/usr/share/dictd/devil.dict.dz"), 400_000),
}


def build_offline_corpus(out: Path = BUNDLED_CORPUS, seed: int = 0) -> dict:
    """Write the bundled corpus from the installed Debian packages; returns per-source statistics."""
    rng = random.Random(seed)
    readers = {
        "gcide": lambda p: _dict_docs(p, "gcide", 1600),
        "wordnet": _wordnet_docs,
        "python-docs": _python_doc_docs,
        "foldoc": lambda p: _dict_docs(p, "foldoc", 1600),
        "jargon": lambda p: _dict_docs(p, "jargon", 1600),
        "devil": lambda p: _dict_docs(p, "devil", 1600),
    }
    missing = [pkg for _, (pkg, path, _) in DEBIAN_SOURCES.items() if not path.exists()]
    if missing:
        raise CorpusError(f"install the Debian packages first: apt-get install {' '.join(missing)}")
    docs: list[Doc] = []
    stats = {}
    seen: set[str] = set()
    for name, (pkg, path, budget) in DEBIAN_SOURCES.items():
        pool = [d for d in readers[name](path) if len(d.text) > 200]
        rng.shuffle(pool)
        taken = 0
        n = 0
        for d in pool:
            key = hashlib.sha1(d.text.encode()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            docs.append(d)
            taken += len(d.text)
            n += 1
            if taken >= budget:
                break
        stats[name] = {"package": pkg, "docs": n, "chars": taken}
    rng.shuffle(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9) as fh:
        for d in docs:
            fh.write(json.dumps({"text": d.text, "source": d.source, "split": d.split}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return stats
