"""Settings dataclasses that describe themselves: each field carries its help text, so the command
line (``arpo_fast/train/config.py``) is built from the fields alone."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Optional

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def bool_of(text: str) -> Optional[bool]:
    """The boolean a setting's text spells (``TRUE_WORDS``/``FALSE_WORDS``, any case), or None."""
    word = text.lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def setting(
    default: Any = dataclasses.MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None
) -> Any:
    """A dataclass field with its help text (``factory``: a default made per instance)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(field: dataclasses.Field) -> str:
    """The help text of a field made by :func:`setting` (one line), or an empty string."""
    return " ".join(field.metadata.get("help", "").split())


def require_counts(settings: Any, *names: str) -> None:
    """Each named field of ``settings`` is at least 1 (ValueError naming the first that is not)."""
    for name in names:
        value = getattr(settings, name)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def require_non_negative(settings: Any, *names: str) -> None:
    """Each named field of ``settings`` is a finite number >= 0 (ValueError naming the first that
    is not)."""
    for name in names:
        value = getattr(settings, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
