"""A python-tool double: it evaluates the arithmetic of ``print(expr)`` after a chosen delay.

``bench_rollout.py`` gives it a heavy-tailed latency; the tree-rollout tests run it with no delay or
a random one. The tests import this module (benchmarks run as scripts and cannot import ``tests/``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from arpo_fast.rollout.tools.base import ToolResult


class Calculator:
    """Answers ``print(expr)`` (or a bare ``expr``) with the value of the arithmetic, or with the
    name of the error it raises, after ``delay(query)`` seconds; ``end`` follows the value, as
    print's does."""

    name = "python"

    def __init__(self, delay: Callable[[str], float] = lambda query: 0.0, end: str = "\n"):
        self.delay, self.end = delay, end

    def __call__(self, query: str) -> ToolResult:
        time.sleep(self.delay(query))
        body = query.strip()
        try:  # what the model wrote is not always arithmetic
            text = str(
                eval(
                    body[len("print(") : -1] if body.startswith("print(") else body,  # noqa: S307 - arithmetic only: no builtins reach it
                    {"__builtins__": {}},
                )
            )
        except Exception as exc:  # noqa: BLE001 - any error is the answer, as python's would be
            text = type(exc).__name__
        return ToolResult(text + self.end)
