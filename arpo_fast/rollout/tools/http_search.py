"""The ``http_search`` tool: ask a search service over HTTP, with retries, backoff and a disk cache.

Request: ``POST <url>`` with JSON ``{"query": str, "top_k": int}``. Response: JSON
``{"results": [{"title": str, "text": str, "id": ...}, ...]}`` (a bare list is accepted too; ``snippet``
or ``contents`` may stand in for ``text``). Connection errors, timeouts, HTTP 429 and 5xx are retried
with exponential backoff; other HTTP errors and malformed responses are not. Successful answers are
appended to a JSONL cache file and served from it afterwards, also across runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

from arpo_fast.rollout.tools.base import ToolResult
from arpo_fast.rollout.tools.search import Hit, format_hits

log = logging.getLogger("arpo_fast.rollout.tools.http_search")


@dataclass
class HttpSearchConfig:
    """Where the service is and how patiently to ask it."""

    url: str = ""
    top_k: int = 5
    snippet_chars: int = 1000
    timeout_s: float = 10.0
    """Per attempt."""
    retries: int = 3
    """Attempts after the first one."""
    backoff_s: float = 0.5
    """Wait before retry i is ``backoff_s * 2**i``."""
    cache_path: Optional[str] = None
    """JSONL file of past answers; None disables the disk cache."""
    headers: dict[str, str] = field(default_factory=dict)
    name: str = "search"

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0 and timeout_s > 0")


class _Permanent(Exception):
    """A failure that retrying will not fix (HTTP 4xx, a response we cannot read)."""


class HttpSearch:
    """Search through an HTTP service; thread-safe."""

    def __init__(self, config: HttpSearchConfig):
        self.config = config
        self.name = config.name
        self.requests = 0
        self._lock = threading.Lock()
        self._cache: dict[str, list[dict]] = _load_cache(config.cache_path)

    def __call__(self, query: str) -> ToolResult:
        start = time.monotonic()
        query = query.strip()
        if not query:
            return ToolResult("The search query is empty.", "bad_input")
        key = self._key(query)
        with self._lock:
            cached = self._cache.get(key)
        from_cache = cached is not None
        if cached is None:
            try:
                cached = self._fetch(query)
            except Exception as exc:  # every failure becomes a result the model can read
                return ToolResult(f"The search service failed: {exc}", "error", time.monotonic() - start)
            self._remember(key, query, cached)
        hits = [_hit(r, i) for i, r in enumerate(cached[: self.config.top_k])]
        text = format_hits(hits, self.config.snippet_chars) or f"No results found for '{query[:200]}'."
        return ToolResult(text, "ok", time.monotonic() - start, info={"cached": from_cache})

    def _key(self, query: str) -> str:
        raw = json.dumps([self.config.url, query, self.config.top_k])
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def _fetch(self, query: str) -> list[dict]:
        cfg = self.config
        body = json.dumps({"query": query, "top_k": cfg.top_k}).encode("utf-8")
        last = None
        for attempt in range(cfg.retries + 1):
            if attempt:
                time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(body)
            except _Permanent:
                raise
            except (OSError, urllib.error.URLError) as exc:  # timeouts, refusals, 5xx, 429
                last = exc
                log.info("search attempt %d/%d failed: %s", attempt + 1, cfg.retries + 1, exc)
        raise RuntimeError(f"no answer after {cfg.retries + 1} attempts (last error: {last})")

    def _post(self, body: bytes) -> list[dict]:
        headers = {"Content-Type": "application/json", **self.config.headers}
        request = urllib.request.Request(self.config.url, body, headers, method="POST")
        with self._lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                raise OSError(f"HTTP {exc.code}") from None
            raise _Permanent(f"HTTP {exc.code} {exc.reason}") from None
        return _parse(payload)

    def _remember(self, key: str, query: str, results: list[dict]) -> None:
        with self._lock:
            self._cache[key] = results
            if self.config.cache_path:
                line = json.dumps({"key": key, "query": query, "results": results}, ensure_ascii=False)
                with open(self.config.cache_path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")


def _parse(payload: bytes) -> list[dict]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Permanent(f"the response is not JSON ({exc})") from None
    results = data.get("results") if isinstance(data, dict) else data
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise _Permanent("the response has no 'results' list of objects")
    return results


def _hit(result: dict, index: int) -> Hit:
    text = result.get("text") or result.get("snippet") or result.get("contents") or ""
    return Hit(
        str(result.get("id", index)),
        str(result.get("title") or ""),
        str(text),
        float(result.get("score") or 0.0),
    )


def _load_cache(path: Optional[str]) -> dict[str, list[dict]]:
    """Read past answers; an unreadable line is skipped (and kept in the file), never fatal."""
    cache: dict[str, list[dict]] = {}
    if not path or not os.path.exists(path):
        return cache
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                cache[entry["key"]] = list(entry["results"])
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    log.warning("%s:%d: skipping an unreadable cache line", path, lineno)
    return cache
