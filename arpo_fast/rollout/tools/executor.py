"""Runs tool calls concurrently and hands back futures, so decoding never waits on a tool.

Identical calls (same tool, same input) within one training step run once and share their future.
A tool that raises, or that is still running after ``timeout_s``, produces an error result for that
call only. A hung tool keeps its worker thread until it returns (Python cannot kill a thread), so
tools should enforce their own limits, as the python tool does; the watchdog only frees the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from arpo_fast.rollout.tools.base import Tool, ToolResult

log = logging.getLogger("arpo_fast.rollout.tools.executor")


@dataclass
class ExecutorConfig:
    """Pool size and the per-call watchdog."""

    max_workers: int = 16
    """Calls that may run at once (threads; each python call is also a separate process)."""
    timeout_s: float = 120.0
    """A call with no result after this long resolves to an error result (the reference: 120 s)."""
    dedup: bool = True
    """Run identical calls within a step once."""

    def __post_init__(self):
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass
class ExecutorStats:
    """Counters since the executor was made: calls submitted, run, served from the step's cache,
    and failures (exception, watchdog timeout, unknown tool)."""

    submitted: int = 0
    executed: int = 0
    cache_hits: int = 0
    errors: int = 0
    timeouts: int = 0


class ToolExecutor:
    """Submit ``(tool name, input)`` calls; get a ``Future[ToolResult]`` that never raises."""

    def __init__(self, tools: Mapping[str, Tool], config: Optional[ExecutorConfig] = None):
        self.tools = dict(tools)
        self.config = config = config or ExecutorConfig()
        self.stats = ExecutorStats()
        self._pool = ThreadPoolExecutor(config.max_workers, thread_name_prefix="arpo-tool")
        self._lock = threading.Lock()
        self._step_cache: dict[tuple[str, str], Future] = {}

    def submit(self, name: str, query: str) -> Future[ToolResult]:
        """Start a call (or join an identical one from this step) and return its future."""
        with self._lock:
            self.stats.submitted += 1
            key = (name, query)
            if self.config.dedup and key in self._step_cache:
                self.stats.cache_hits += 1
                return self._step_cache[key]
            outer: Future = Future()
            if self.config.dedup:
                self._step_cache[key] = outer
            tool = self.tools.get(name)
            if tool is None:
                self.stats.errors += 1
                available = ", ".join(sorted(self.tools)) or "none"
                outer.set_result(
                    ToolResult(f"Unknown tool '{name}'; available: {available}.", "unknown_tool")
                )
                return outer
            self.stats.executed += 1
        inner = self._pool.submit(self._run, tool, name, query)
        inner.add_done_callback(lambda f: _settle(outer, f.result()))
        self._arm_watchdog(outer, name)
        return outer

    def sandboxes(self) -> dict[str, str]:
        """How each tool that has a sandbox isolates its runs (``{"python": "bwrap"}``), for the
        run's log and summary."""
        modes = {name: getattr(t, "mode", None) for name, t in self.tools.items()}
        return {name: mode for name, mode in modes.items() if isinstance(mode, str)}

    def run(self, name: str, query: str) -> ToolResult:
        """Submit and wait (for scripts and tests)."""
        return self.submit(name, query).result()

    def new_step(self) -> None:
        """Forget this step's calls: identical calls in the next step run again."""
        with self._lock:
            self._step_cache.clear()

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> ToolExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=False)

    def _run(self, tool: Tool, name: str, query: str) -> ToolResult:
        start = time.monotonic()
        try:
            result = tool(query)
            if not isinstance(result, ToolResult):
                raise TypeError(f"tool {name!r} returned {type(result).__name__}, not ToolResult")
        except Exception as exc:  # one broken call must not take the rollout down
            log.exception("tool %r failed on input %.200r", name, query)
            with self._lock:
                self.stats.errors += 1
            result = ToolResult(f"The {name} tool failed: {type(exc).__name__}: {exc}", "error")
        if not result.elapsed_s:
            result.elapsed_s = time.monotonic() - start
        return result

    def _arm_watchdog(self, outer: Future, name: str) -> None:
        def expire() -> None:
            message = f"The {name} tool did not answer within {self.config.timeout_s:g} s."
            if _settle(outer, ToolResult(message, "timeout", self.config.timeout_s)):
                with self._lock:
                    self.stats.timeouts += 1

        timer = threading.Timer(self.config.timeout_s, expire)
        timer.daemon = True
        timer.start()
        outer.add_done_callback(lambda _: timer.cancel())


def _settle(future: Future, result: ToolResult) -> bool:
    """Set the result unless the watchdog or the tool got there first."""
    try:
        future.set_result(result)
        return True
    except Exception:  # InvalidStateError: already resolved
        return False
