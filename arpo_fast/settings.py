"""Settings dataclasses that describe themselves: each field carries its help text, so the command
line (``arpo_fast/train/config.py``) is built from the fields alone."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


def setting(default: Any = dataclasses.MISSING, help: str = "", *,
            factory: Optional[Callable[[], Any]] = None) -> Any:
    """A dataclass field with its help text (``factory``: a default made per instance)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(field: dataclasses.Field) -> str:
    """The help text of a field made by :func:`setting` (one line), or an empty string."""
    return " ".join(field.metadata.get("help", "").split())
