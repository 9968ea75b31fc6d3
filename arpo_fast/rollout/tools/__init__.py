"""Tools the model can call, looked up by name.

A tool is any object with a ``name`` and ``__call__(query: str) -> ToolResult``. Register a factory
under a name with :func:`register_tool`; :func:`create_tool` builds one from keyword settings.
Built-in: ``python`` (sandboxed interpreter), ``search`` (local BM25) and ``http_search``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from arpo_fast.rollout.tools.base import Tool, ToolResult

_FACTORIES: dict[str, Callable[..., Tool]] = {}
_BUILTINS_DONE = False


def register_tool(name: str, factory: Callable[..., Tool], *, replace: bool = False) -> None:
    """Make ``create_tool(name, **settings)`` call ``factory(**settings)``."""
    if name in _FACTORIES and not replace:
        raise ValueError(f"a tool named {name!r} is already registered; pass replace=True to swap it")
    _FACTORIES[name] = factory


def create_tool(name: str, **settings: Any) -> Tool:
    """Build the tool registered as ``name`` with ``settings``."""
    _register_builtins()
    if name not in _FACTORIES:
        raise KeyError(f"no tool named {name!r}; registered: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](**settings)


def _register_builtins() -> None:
    # imported lazily: the search backends pull in numpy/bm25s, which a python-only setup never needs
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from arpo_fast.rollout.tools.http_search import HttpSearch, HttpSearchConfig
    from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
    from arpo_fast.rollout.tools.search import BM25Search, SearchConfig

    _FACTORIES.setdefault("python", lambda **kw: PythonTool(PythonToolConfig(**kw)))
    _FACTORIES.setdefault("search", lambda **kw: BM25Search(SearchConfig(**kw)))
    _FACTORIES.setdefault("http_search", lambda **kw: HttpSearch(HttpSearchConfig(**kw)))


__all__ = ["Tool", "ToolResult", "create_tool", "register_tool"]
