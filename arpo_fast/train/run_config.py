"""Settings as YAML: ``--config FILE`` and the run folder's ``config.yaml``.

A settings file maps setting names (a flag's name, with ``-`` or ``_``) to values; a value means
what the same text means on the command line (``auto``, or null, for a setting whose default
depends on the job). ``--tool-settings`` and ``--reward-by-source`` may be written as mappings, and
``--tools`` and ``--report-to`` as lists. The ``rollout:`` and ``update:`` sections of a nested
config (a checkpoint's trainer state holds one) are read too.

Every run writes ``config.yaml`` into its folder: all of its settings, in ``--help``'s sections,
each ``auto`` one followed by what it resolved to as a comment. ``--out`` and ``--resume`` are not
in it, so it is a valid ``--config`` for a new run. ``--resume true`` starts from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from arpo_fast.train.config import GROUPS, TrainConfig
from arpo_fast.train.flags import JSON_SETTINGS, SECTIONS, Flag, all_flags, by_name, lookup

FILE = "config.yaml"
HEADER = "# arpo_fast run settings"
"""The first line of every config.yaml this project writes (only such a file is ever replaced)."""
NOT_SAVED = ("out", "resume", "plan_memory", "gpus", "gpu_memory_gib")


def read(path, where: str, *, legacy: bool = False) -> dict[str, Any]:
    """The settings of YAML file ``path`` by flag-level name; a problem is a ValueError that starts
    with ``where`` (e.g. ``--config run.yaml``). ``legacy``: a checkpoint's own config, whose names
    may be gone and whose empty or 0 placeholders mean auto."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not a YAML text file (it is not UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}{line})") from None
    return settings_of(data, where, legacy=legacy)


def settings_of(data: Any, where: str, *, legacy: bool = False) -> dict[str, Any]:
    """Flag-level settings from a parsed mapping (see :func:`read`)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of setting: value, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in GROUPS and isinstance(value, dict):
            flat |= value
        else:
            flat[str(key)] = value
    flags = by_name()
    settings = {}
    for key, value in flat.items():
        try:
            flag = lookup(key, flags, where)
        except ValueError:
            if legacy:
                continue
            raise
        if legacy and flag.auto and value in (0, ""):
            value = None  # the placeholders that meant auto before it had a name
        if legacy and flag.name == "report_to" and value == "":
            value = "none"
        try:
            settings[flag.name] = flag.read(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {key}: {exc}") from None
    return settings


def _scalar(value: Any) -> str:
    """``value`` as YAML flow text (quoted where YAML would read it as something else)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def _line(flag: Flag, cfg: TrainConfig) -> str:
    value = cfg.flat()[flag.name]
    if flag.name in cfg.auto_settings:
        resolved = "" if value is None else f"  # {flag.show(value)}"
        return f"{flag.name}: auto{resolved}"
    if flag.name in JSON_SETTINGS and value:
        try:
            value = json.loads(value)  # a mapping reads better than its JSON text
        except ValueError:
            pass
    return f"{flag.name}: {_scalar(value)}"


def render(cfg: TrainConfig) -> str:
    """``config.yaml``'s text for ``cfg``."""
    lines = [
        HEADER + " (written by arpo_fast): --config FILE reads them, flags given override them;",
        "# --out DIR --resume true continues the run with them. An auto setting is followed by its value.",
        f"# run folder: {cfg.out}",
    ]
    flags = [f for f in all_flags() if f.name not in NOT_SAVED]
    for section, about in SECTIONS.items():
        mine = [f for f in flags if f.section == section]
        if mine:
            lines += ["", f"# --- {section}: {about}"] + [_line(f, cfg) for f in mine]
    return "\n".join(lines) + "\n"


def check_writable(out) -> None:
    """Raise ValueError if ``out``'s config.yaml is a file this project did not write."""
    path = Path(out) / FILE
    if path.is_symlink() or (path.exists() and not _ours(path)):
        raise ValueError(
            f"{path} exists and was not written by arpo_fast: it was left untouched; move it away "
            "or choose another --out"
        )


def _ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def save(cfg: TrainConfig) -> Path:
    """Write (or replace, whole) the run folder's config.yaml."""
    assert cfg.out is not None, "resolve_auto gives --out its value"
    path = Path(cfg.out) / FILE
    check_writable(cfg.out)
    tmp = path.with_name(FILE + ".tmp")
    tmp.write_text(render(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def saved(out: str) -> Optional[tuple[dict[str, Any], Path]]:
    """The settings a run in ``out`` was started (or last resumed) with, and where they were read
    from: its config.yaml, or for a run written before config.yaml existed, its checkpoint's
    trainer state. None when neither is there."""
    path = Path(out) / FILE
    if path.is_file():
        settings = read(path, f"--resume: {path}")
    else:
        from arpo_fast.train.checkpoint import find_checkpoint, load_trainer_state

        checkpoint = find_checkpoint(out)
        if checkpoint is None:
            return None
        path = checkpoint
        config = load_trainer_state(checkpoint).get("config")
        settings = settings_of(config or {}, f"--resume: {checkpoint}", legacy=True)
    return {k: v for k, v in settings.items() if k not in NOT_SAVED}, path
