"""Tools the model can call, looked up by name.

A tool is any object with a ``name`` and ``__call__(query: str) -> ToolResult``. Register a factory
under a name with :func:`register_tool`; :func:`create_tool` builds one from keyword settings, and
:func:`check_tool_settings` checks such settings without building anything slow (a trainer calls it
before it loads the model). Built-in: ``python`` (sandboxed interpreter), ``search`` (local BM25)
and ``http_search``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from arpo_fast.rollout.tools.base import Tool, ToolResult
from arpo_fast.rollout.tools.validate import build_settings, check_call, close_match


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Tool]
    settings: Optional[type] = None
    """A settings dataclass: the factory then takes one instance of it instead of keywords."""
    check: Optional[Callable[[Any], None]] = None
    """Quick checks of a settings instance beyond the dataclass's own (a file that must exist, a
    sandbox that must work here); raises ValueError."""


_TOOLS: dict[str, _Entry] = {}
_BUILTINS_DONE = False


def register_tool(
    name: str,
    factory: Callable[..., Tool],
    *,
    replace: bool = False,
    settings: Optional[type] = None,
    check: Optional[Callable[[Any], None]] = None,
) -> None:
    """Make ``create_tool(name, **kw)`` call ``factory(**kw)``, or, with a ``settings`` dataclass,
    ``factory(settings(**kw))`` after each name and value is checked against the dataclass's
    fields; ``check(settings_instance)`` may add quick checks of its own."""
    if name in _TOOLS and not replace:
        raise ValueError(f"a tool named {name!r} is already registered; pass replace=True to swap it")
    _TOOLS[name] = _Entry(factory, settings, check)


def tool_names() -> list[str]:
    """The names a tool is registered under."""
    _register_builtins()
    return sorted(_TOOLS)


def _entry(name: str) -> _Entry:
    _register_builtins()
    if name not in _TOOLS:
        raise KeyError(
            f"no tool named {name!r}{close_match(name, _TOOLS)}; registered: {', '.join(sorted(_TOOLS))}"
        )
    return _TOOLS[name]


def check_tool_settings(name: str, **settings: Any) -> Any:
    """Check ``settings`` for the tool ``name`` without building it: unknown names (with the close
    match), values of the wrong type and the tool's quick checks each raise a one-line ValueError
    (KeyError for an unknown tool). Returns the settings instance, if the tool has a class."""
    entry = _entry(name)
    if entry.settings is None:
        check_call(entry.factory, settings)
        return None
    config = build_settings(entry.settings, settings)
    if entry.check is not None:
        entry.check(config)
    return config


def create_tool(name: str, **settings: Any) -> Tool:
    """Build the tool registered as ``name`` with ``settings`` (checked as by
    :func:`check_tool_settings`)."""
    entry = _entry(name)
    if entry.settings is None:
        return entry.factory(**settings)
    return entry.factory(build_settings(entry.settings, settings))


def _register_builtins() -> None:
    # imported lazily: the search backends pull in numpy/bm25s, which a python-only setup never needs
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from arpo_fast.rollout.tools import python_tool, search
    from arpo_fast.rollout.tools.http_search import HttpSearch, HttpSearchConfig

    for name, entry in (
        ("python", _Entry(python_tool.PythonTool, python_tool.PythonToolConfig, python_tool.check_config)),
        ("search", _Entry(search.BM25Search, search.SearchConfig, search.check_config)),
        ("http_search", _Entry(HttpSearch, HttpSearchConfig)),
    ):
        _TOOLS.setdefault(name, entry)


__all__ = ["Tool", "ToolResult", "check_tool_settings", "create_tool", "register_tool", "tool_names"]
