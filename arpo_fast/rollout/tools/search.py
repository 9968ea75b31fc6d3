"""The ``search`` tool: BM25 over a local JSONL corpus, with the index cached on disk.

The corpus is one JSON object per line: ``{"id": ..., "title": ..., "text": ...}`` (``text``
required). The index (bm25s's sparse matrices plus each document's byte span in the corpus) is
saved next to the corpus, in ``<corpus>.bm25s/`` (or ``index_dir``), and rebuilt when the corpus file
or the BM25 settings change. That folder is the index's own: a marker file lists the files written
there, only those are ever replaced, and a non-empty folder without the marker is refused. Documents
are read back from the corpus by offset, so memory holds only the index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from arpo_fast.rollout.tools.base import ToolResult

log = logging.getLogger("arpo_fast.rollout.tools.search")
INDEX_FORMAT = 2


@dataclass
class SearchConfig:
    """Where the corpus is and how results are cut."""

    corpus_path: str = ""
    top_k: int = 5
    """Documents returned per query (the reference returns 10 web snippets)."""
    snippet_chars: int = 1000
    """Characters of each document shown (the reference's cap is 1000)."""
    index_dir: Optional[str] = None
    """Folder of the cached index (default ``<corpus_path>.bm25s``): new, empty, or one that holds an
    index written here before; any other non-empty folder is refused, never overwritten."""
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str = "en"
    name: str = "search"

    def __post_init__(self):
        if not self.corpus_path:
            raise ValueError("corpus_path is required: a JSONL file of {id, title, text} objects")
        if self.top_k < 1 or self.snippet_chars < 1:
            raise ValueError(f"top_k and snippet_chars must be >= 1, got {self.top_k}, {self.snippet_chars}")


def check_config(config: SearchConfig) -> None:
    """Quick checks before anything slow: the corpus is a readable file, and the index folder is
    new, empty or an index of ours (the index itself is built or loaded with the tool)."""
    path = config.corpus_path
    if not os.path.isfile(path):
        raise ValueError(f"corpus_path {path}: {'is a directory' if os.path.isdir(path) else 'no such file'}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"corpus_path {path}: not readable")
    _index_state(config.index_dir or path + ".bm25s", refuse_foreign=True)


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
        try:
            hits = self.search(query, self.config.top_k)
        except Exception as exc:  # a tool never raises into the rollout
            log.exception("search failed on %.200r", query)
            return ToolResult(f"The search failed: {type(exc).__name__}: {exc}", "error")
        if not hits:
            return ToolResult(f"No results found for '{query[:200]}'.", "ok", time.monotonic() - start)
        return ToolResult(
            format_hits(hits, self.config.snippet_chars),
            "ok",
            time.monotonic() - start,
            info={"ids": [h.id for h in hits]},
        )

    def search(self, query: str, k: int) -> list[Hit]:
        """The ``k`` best documents for ``query`` (fewer when fewer match any query term)."""
        words = self._bm25s.tokenize(
            [query], stopwords=self.config.stopwords, return_ids=False, show_progress=False
        )[0]
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
        return {
            "format": INDEX_FORMAT,
            "corpus_size": stat.st_size,
            "corpus_mtime_ns": stat.st_mtime_ns,
            "k1": c.k1,
            "b": c.b,
            "method": c.method,
            "stopwords": c.stopwords,
        }

    def _load_or_build(self):
        state = _index_state(self.index_dir, refuse_foreign=True)
        manifest = self._manifest()
        if state == "ours":
            try:
                if _read_marker(self.index_dir)["manifest"] == manifest:
                    return self._load()
                log.info("search index at %s is stale; rebuilding", self.index_dir)
            except (OSError, KeyError, TypeError, json.JSONDecodeError):
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
        table = np.asarray(spans, dtype=np.int64)
        self._save(retriever, table, manifest)
        log.info("built the search index of %d documents in %.1f s", len(table), time.monotonic() - started)
        return retriever, table

    def _save(self, retriever, spans: np.ndarray, manifest: dict) -> None:
        """Write the index into a new folder of ours, then put it in place of a missing, empty or
        earlier index folder of ours; a folder holding anything else is never touched."""
        parent = os.path.dirname(os.path.abspath(self.index_dir))
        tmp = None
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".arpo_bm25s_build_", dir=parent)
            retriever.save(tmp, show_progress=False)
            np.save(os.path.join(tmp, "spans.npy"), spans)
            files = sorted(os.listdir(tmp))
            if not set(files) <= INDEX_FILES:  # a marker must only ever name files of this list
                raise OSError(
                    f"bm25s wrote files this index does not know: {sorted(set(files) - INDEX_FILES)}"
                )
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"format": INDEX_FORMAT, "files": files, "manifest": manifest}, f)
            with _SAVE_LOCK:
                _swap_in(tmp, self.index_dir)
            tmp = None
        except OSError as exc:
            log.warning(
                "could not cache the search index in %s (%s); it will be rebuilt next time",
                self.index_dir,
                exc,
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # our own build folder


MARKER = "arpo_fast_index.json"
"""Names the files of an index folder that arpo_fast wrote, with the manifest they were built for."""
INDEX_FILES = frozenset(
    {
        "spans.npy",
        "params.index.json",
        "vocab.index.json",
        "data.csc.index.npy",
        "indices.csc.index.npy",
        "indptr.csc.index.npy",
        "nonoccurrence_array.index.npy",
    }
)
"""Every name this code (and bm25s for it) writes into an index folder: the only names a marker may
list, and so the only files ever removed from one. A marker is data that anybody may have written
(an index shipped beside a corpus): a name outside this list is refused, never acted on."""
_LEGACY_FILES = INDEX_FILES - {"nonoccurrence_array.index.npy"} | {"manifest.json"}


def _read_marker(folder: str) -> dict:
    """The marker of ``folder``; ValueError (one line) when it lists anything but our own names."""
    path = os.path.join(folder, MARKER)
    with open(path, "rb") as f:
        text = f.read(1 << 20)
    try:
        marker = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{path} is not an index marker (not valid JSON)") from None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, list):
        raise ValueError(f"{path} is not an index marker (no list of files)")
    for name in files:
        if not isinstance(name, str) or name not in INDEX_FILES | {MARKER}:
            shown = json.dumps(name)[:80] if isinstance(name, str) else type(name).__name__
            raise ValueError(
                f"{path} lists {shown}, which is not a file of a search index: refusing to use "
                "or replace that folder (remove the marker, or choose another index_dir)"
            )
    return marker


def _our_files(folder: str) -> Optional[set]:
    """The files of an index folder that arpo_fast wrote, or None when it is not such a folder.
    A marker that lists a name outside :data:`INDEX_FILES` raises ValueError."""
    if os.path.lexists(os.path.join(folder, MARKER)):
        try:
            return {*_read_marker(folder)["files"], MARKER}
        except OSError:
            return None
    try:  # format 1 (no marker yet): a manifest of ours and bm25s's files only
        with open(os.path.join(folder, "manifest.json")) as f:
            legacy = json.load(f).get("format") == 1
        return set(_LEGACY_FILES) if legacy and set(os.listdir(folder)) <= _LEGACY_FILES else None
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _index_state(folder: str, refuse_foreign: bool = False) -> str:
    """``missing``, ``empty``, ``ours`` (an index arpo_fast wrote) or ``foreign`` (a ValueError
    with ``refuse_foreign``)."""
    if not os.path.lexists(folder):
        return "missing"
    state = "foreign"
    if os.path.isdir(folder) and not os.path.islink(folder):
        names = set(os.listdir(folder))
        ours = _our_files(folder) if names else None
        state = "empty" if not names else "ours" if ours is not None and names <= ours else "foreign"
    if state == "foreign" and refuse_foreign:
        raise ValueError(
            f"index_dir {folder} is not empty and holds no search index of arpo_fast (no {MARKER}); "
            "give a new or empty folder: the index is never written over files it did not write"
        )
    return state


def _swap_in(new: str, folder: str) -> None:
    """Put the folder ``new`` at ``folder``: an old index of ours is moved aside and only its own
    files are deleted; anything else there stops the swap (OSError)."""
    try:
        state = _index_state(folder)
    except ValueError as exc:
        raise OSError(str(exc)) from None
    if state == "foreign":
        raise OSError(f"{folder} now holds files that are not ours")
    if state in ("missing", "empty"):
        os.rename(new, folder)  # rename(2) replaces an empty folder
        return
    ours = _our_files(folder)
    if ours is None:  # its marker went unreadable since the state was read
        raise OSError(f"{folder}: cannot read which of its files are ours")
    old = tempfile.mkdtemp(prefix=".arpo_bm25s_old_", dir=os.path.dirname(os.path.abspath(folder)))
    os.rename(folder, old + "/index")
    try:
        os.rename(new, folder)
    except OSError:
        os.rename(old + "/index", folder)
        os.rmdir(old)
        raise
    _remove_names(os.path.join(old, "index"), ours)
    os.rmdir(old)


def _remove_names(folder: str, names: set) -> None:
    """Unlink the plain names ``names`` (checked against :data:`INDEX_FILES`) inside ``folder``,
    through a descriptor of that folder, then the folder itself."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in names:
            if name not in INDEX_FILES | {MARKER} | _LEGACY_FILES:
                raise OSError(f"refusing to remove {name!r}: not a file of a search index")
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)
    os.rmdir(folder)


_SAVE_LOCK = threading.Lock()
__all__ = ["BM25Search", "Hit", "SearchConfig", "format_hits", "read_corpus"]
