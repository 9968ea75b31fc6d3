"""What every tool returns, and the one method a tool must have."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class ToolResult:
    """A tool's answer to one call.

    ``text`` is what the model reads inside ``<result>``; ``status`` is ``ok`` or a short failure
    kind (``error``, ``timeout``, ``killed``, ``bad_input``, ...), for logs and counters.
    """

    text: str
    status: str = "ok"
    elapsed_s: float = 0.0
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@runtime_checkable
class Tool(Protocol):
    """A callable tool: one string in (a query, code), one :class:`ToolResult` out. Never raises
    for bad input; the executor still guards against tools that do."""

    name: str

    def __call__(self, query: str) -> ToolResult: ...
