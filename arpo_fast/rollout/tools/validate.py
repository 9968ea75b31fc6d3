"""Tool settings, as a user writes them (JSON), checked against a tool's settings dataclass: every
name known (else the close match is named), every value of its field's type, before the tool is
built. Each failure is one line; the caller adds which flag or tool it came from."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import typing
from collections.abc import Callable, Iterable
from typing import Any, Optional


def close_match(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the option closest to ``name``, or ``''``."""
    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {found[0]!r}?)" if found else ""


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as JSON, cut to ``limit`` characters (for a message)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown(kind: str, name: str, options: Iterable[str]) -> str:
    """``no <kind> 'name' (did you mean ...?); <kind>s: a, b, c``."""
    options = sorted(options)
    return f"no {kind} {name!r}{close_match(name, options)}; {kind}s: {', '.join(options) or 'none'}"


def build_settings(cls: type, settings: dict) -> Any:
    """``cls(**settings)`` for a settings dataclass, with each name and value checked first.
    ValueError (one line) names the first bad one; the dataclass's own checks run after."""
    if not isinstance(settings, dict):
        raise ValueError(f"settings must be a JSON object, got {shown(settings)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in settings.items():
        if name not in fields:
            raise ValueError(unknown("setting", name, fields))
        values[name] = convert(value, hints.get(name, Any), name)
    try:
        return cls(**values)
    except TypeError as exc:  # a required setting left out
        raise ValueError(" ".join(str(exc).split())) from None


def check_call(factory: Callable, settings: dict) -> None:
    """For a tool registered without a settings class: the names ``factory`` accepts."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for name in settings:
        if name not in names:
            raise ValueError(unknown("setting", name, names))


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def convert(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the field ``name`` of type ``hint`` takes it (a JSON list becomes a tuple);
    ValueError naming the field and the expected type otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(value, inner[0], name) if len(inner) == 1 else value
    if hint in _KINDS:
        if _fits(value, hint):
            return value
        raise ValueError(f"{name} must be {_KINDS[hint]}, got {shown(value)}")
    if origin is tuple and args[1:] == (Ellipsis,):
        if isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value):
            return tuple(value)
        raise ValueError(f"{name} must be a list of {_plural(args[0])}, got {shown(value)}")
    if origin is dict and len(args) == 2:
        if isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items()):
            return value
        raise ValueError(f"{name} must be an object of {_plural(args[1])}, got {shown(value)}")
    return value


def _fits(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        if isinstance(value, float):
            return math.isfinite(value)
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True


def _plural(kind: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(kind, "values")


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of the JSON ``text`` nest (strings skipped): one linear
    scan, so a depth bound can be checked before a parser recurses that deep."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


MAX_JSON_DEPTH = 32
"""Deepest nesting accepted in a JSON setting: far more than any setting needs, far less than
Python's recursion limit, so no parser or message ever recurses out of its stack."""


def load_json(text: str, what: str) -> Optional[Any]:
    """The value of the JSON ``text`` (None for empty text); ValueError naming ``what``."""
    if not text:
        return None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what}: JSON nested too deeply ({depth} levels; at most {MAX_JSON_DEPTH})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc.msg})") from None
