"""The ``search`` tool: BM25 over a local JSONL corpus, with the index cached on disk.

The corpus is one JSON object per line: ``{"id": ..., "title": ..., "text": ...}`` (``text``
required). The index (bm25s's sparse matrices plus each document's byte span in the corpus) is
saved next to the corpus, in ``<corpus>.bm25s/``, and rebuilt when the corpus file or the BM25
settings change. Documents are read back from the corpus by offset, so memory holds only the index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from arpo_fast.rollout.tools.base import ToolResult

log = logging.getLogger("arpo_fast.rollout.tools.search")
INDEX_FORMAT = 1


@dataclass
class SearchConfig:
    """Where the corpus is and how results are cut."""

    corpus_path: str = ""
    top_k: int = 5
    """Documents returned per query (the reference returns 10 web snippets)."""
    snippet_chars: int = 1000
    """Characters of each document shown (the reference's cap is 1000)."""
    index_dir: Optional[str] = None
    """Where the index is cached; default ``<corpus_path>.bm25s``."""
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str = "en"
    name: str = "search"

    def __post_init__(self):
        if not self.corpus_path:
            raise ValueError("corpus_path is required: a JSONL file of {id, title, text} objects")
        if self.top_k < 1 or self.snippet_chars < 1:
            raise ValueError(f"top_k and snippet_chars must be >= 1, got {self.top_k}, "
                             f"{self.snippet_chars}")


@dataclass(frozen=True)
class Hit:
    """One retrieved document."""

    id: str
    title: str
    text: str
    score: float


def format_hits(hits: list[Hit], snippet_chars: int) -> str:
    """``Page i: title`` then the first ``snippet_chars`` characters of the text, as in the reference."""
    pages = []
    for i, hit in enumerate(hits, 1):
        text = hit.text if len(hit.text) <= snippet_chars else hit.text[:snippet_chars] + "..."
        pages.append(f"Page {i}: {hit.title}\n{text}" if hit.title else f"Page {i}: {text}")
    return "\n\n".join(pages)


def read_corpus(path: str) -> Iterator[tuple[int, int, dict]]:
    """Yield ``(start byte, end byte, document)`` for every non-blank line, with clear errors."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            yield start, offset, parse_document(raw, f"{path}, line {lineno}")


def parse_document(raw: bytes, where: str) -> dict:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not a valid JSON line ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'text' field, got {type(doc).__name__}")
    if not isinstance(doc.get("text"), str):
        raise ValueError(f"{where}: the document has no string 'text' field (keys: {sorted(doc)})")
    if doc.get("title") is not None and not isinstance(doc["title"], str):
        raise ValueError(f"{where}: 'title' must be a string")
    return doc


class BM25Search:
    """Local BM25 search; thread-safe for queries."""

    def __init__(self, config: SearchConfig):
        import bm25s  # imported here so that the python tool alone never needs it

        self._bm25s = bm25s
        self.config = config
        self.name = config.name
        self.index_dir = config.index_dir or config.corpus_path + ".bm25s"
        self._fd = os.open(config.corpus_path, os.O_RDONLY)
        self._retriever, self._spans = self._load_or_build()
        self._vocab = self._retriever.vocab_dict

    def __call__(self, query: str) -> ToolResult:
        start = time.monotonic()
        query = query.strip()
        if not query:
            return ToolResult("The search query is empty.", "bad_input")
        hits = self.search(query, self.config.top_k)
        if not hits:
            return ToolResult(f"No results found for '{query[:200]}'.", "ok", time.monotonic() - start)
        return ToolResult(format_hits(hits, self.config.snippet_chars), "ok", time.monotonic() - start,
                          info={"ids": [h.id for h in hits]})

    def search(self, query: str, k: int) -> list[Hit]:
        """The ``k`` best documents for ``query`` (fewer when fewer match any query term)."""
        words = self._bm25s.tokenize([query], stopwords=self.config.stopwords, return_ids=False,
                                     show_progress=False)[0]
        words = [w for w in words if w in self._vocab]
        if not words:
            return []
        k = min(k, len(self._spans))
        ids, scores = self._retriever.retrieve([words], k=k, show_progress=False)
        return [self._hit(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]

    def _hit(self, index: int, score: float) -> Hit:
        start, end = (int(x) for x in self._spans[index])
        doc = json.loads(os.pread(self._fd, end - start, start))
        return Hit(str(doc.get("id", index)), doc.get("title") or "", doc["text"], score)

    def close(self) -> None:
        os.close(self._fd)

    # -- index cache ------------------------------------------------------------------------

    def _manifest(self) -> dict:
        stat = os.stat(self.config.corpus_path)
        c = self.config
        return {"format": INDEX_FORMAT, "corpus_size": stat.st_size, "corpus_mtime_ns": stat.st_mtime_ns,
                "k1": c.k1, "b": c.b, "method": c.method, "stopwords": c.stopwords}

    def _load_or_build(self):
        manifest = self._manifest()
        try:
            with open(os.path.join(self.index_dir, "manifest.json")) as f:
                if json.load(f) == manifest:
                    return self._load()
            log.info("search index at %s is stale; rebuilding", self.index_dir)
        except (OSError, ValueError):
            pass  # no usable index yet
        return self._build(manifest)

    def _load(self):
        retriever = self._bm25s.BM25.load(self.index_dir, mmap=True, show_progress=False)
        return retriever, np.load(os.path.join(self.index_dir, "spans.npy"))

    def _build(self, manifest: dict):
        started = time.monotonic()
        spans, texts = [], []
        for start, end, doc in read_corpus(self.config.corpus_path):
            spans.append((start, end))
            texts.append(f"{doc.get('title') or ''} {doc['text']}")
        if not texts:
            raise ValueError(f"{self.config.corpus_path}: the corpus has no documents")
        c = self.config
        tokens = self._bm25s.tokenize(texts, stopwords=c.stopwords, return_ids=False, show_progress=False)
        del texts
        retriever = self._bm25s.BM25(k1=c.k1, b=c.b, method=c.method)
        retriever.index(tokens, show_progress=False)
        spans = np.asarray(spans, dtype=np.int64)
        self._save(retriever, spans, manifest)
        log.info("built the search index of %d documents in %.1f s", len(spans),
                 time.monotonic() - started)
        return retriever, spans

    def _save(self, retriever, spans: np.ndarray, manifest: dict) -> None:
        parent = os.path.dirname(os.path.abspath(self.index_dir))
        tmp = tempfile.mkdtemp(prefix=".bm25s_build_", dir=parent)
        try:
            retriever.save(tmp, show_progress=False)
            np.save(os.path.join(tmp, "spans.npy"), spans)
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(manifest, f)
            # swap in whole: a reader never sees a half-written index
            with _SAVE_LOCK:
                shutil.rmtree(self.index_dir, ignore_errors=True)
                os.replace(tmp, self.index_dir)
        except OSError as exc:
            log.warning("could not cache the search index in %s (%s); it will be rebuilt next time",
                        self.index_dir, exc)
            shutil.rmtree(tmp, ignore_errors=True)


_SAVE_LOCK = threading.Lock()
__all__ = ["BM25Search", "Hit", "SearchConfig", "format_hits", "read_corpus"]
