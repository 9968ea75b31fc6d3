"""Which sandbox the python tool uses here: each candidate mode tried with a small probe, once per
process and setting, and the choice logged (``sandbox.py`` describes the modes)."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Optional

from arpo_fast.rollout.tools import hostdirs, interpreter, sandbox, seccomp
from arpo_fast.rollout.tools.base import ToolResult
from arpo_fast.rollout.tools.sandbox import Isolation, SandboxUnavailable, budget
from arpo_fast.rollout.tools.uids import UidPool

if TYPE_CHECKING:
    from arpo_fast.rollout.tools.python_tool import PythonToolConfig

log = logging.getLogger("arpo_fast.rollout.tools.python")

_CHOICE_LOCK = threading.Lock()
_CHOSEN: dict[tuple, tuple[Isolation, Callable[[], None]]] = {}
_ANNOUNCED: set[tuple] = set()
Execute = Callable[["PythonToolConfig", Isolation, str], ToolResult]
"""One run of code in an isolation (``python_tool.execute``): how a candidate mode is probed."""
# touches the standard library (fails when the interpreter is unreadable after the uid drop)
PROBE_CODE = "import json, os, socket, traceback\nprint(os.getuid())"


def choose(config: PythonToolConfig, execute: Execute, announce: bool = True) -> Isolation:
    """The isolation for ``config`` on this machine: probed once per process and setting (each
    candidate mode runs a tiny program through ``execute``); logged once, at the first call with
    ``announce`` (a settings check probes quietly, the tool that runs code says what it got)."""
    key = (os.getpid(), config.sandbox, config.python, config.extra_ro_paths, config.tmp_root)
    with _CHOICE_LOCK:
        if key not in _CHOSEN:
            _CHOSEN[key] = _choose(config, execute)
        iso, log_choice = _CHOSEN[key]
        if announce and key not in _ANNOUNCED:
            _ANNOUNCED.add(key)
            log_choice()
        return iso


def _choose(config: PythonToolConfig, execute: Execute) -> tuple[Isolation, Callable[[], None]]:
    groups, groups_why = sandbox.run_cgroups()
    reasons: list[str] = []
    for mode in sandbox.candidates(config.sandbox):
        why = sandbox.why_not(mode, config.python)
        if why is None:
            iso, why = _try_mode(config, mode, groups, execute)
            if iso is not None:
                return iso, lambda: _log_choice(config, iso, groups_why, reasons)
        reasons.append(f"{mode}: {' '.join(why.split())}")
    raise SandboxUnavailable(
        f"python tool: sandbox={config.sandbox!r} cannot isolate model code "
        f"here ({'; '.join(reasons)}); {sandbox.HOW_TO_FIX}"
    )


def _try_mode(
    config: PythonToolConfig, mode: str, groups, execute: Execute
) -> tuple[Optional[Isolation], str]:
    root = sandbox.is_root()
    uids = UidPool.shared() if root and mode != "unsafe" else None
    python = config.python
    if mode == "uid":
        tmp = config.tmp_root or tempfile.gettempdir()
        if not interpreter.reachable_by_others(tmp):
            return None, f"tmp_root {tmp} is not reachable by other users (give one they can enter)"
        try:
            python = interpreter.readable_copy(config.python)
        except (OSError, ValueError) as exc:
            return None, f"no interpreter the run's uid can read ({exc})"
    # the uid mode shares the host's file system: every folder all users may write to is swept
    shared = hostdirs.writable_dirs() if mode == "uid" else ()
    if uids is not None:
        taken = uids.collision(shared or hostdirs.usual())
        if taken:
            return None, taken
    # ... and its network: no socket and no message queue can be made there
    program = seccomp.filter_program(host_shared=mode == "uid")
    why = ""
    for net_private in (True, False) if mode in ("uid", "unsafe") else (True,):
        iso = Isolation(mode, python, uids, groups, net_private, program, shared_dirs=shared)
        why = _probe(config, iso, execute)
        if not why:
            return iso, ""
    return None, why


def _probe(config: PythonToolConfig, iso: Isolation, execute: Execute) -> str:
    """Run a tiny program in ``iso``; '' when it worked (and not as root unless unsafe), else why."""
    try:
        result = execute(replace(config, timeout_s=30.0, max_output_chars=4000), iso, PROBE_CODE)
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
        return str(exc)
    if not result.ok or not result.text.strip().isdigit():
        return " ".join(result.text.split())[-300:]
    if sandbox.is_root() and iso.mode != "unsafe" and int(result.text) == 0:
        return "the probe ran as root"  # never: each mode drops to a throw-away uid
    return ""


def _log_choice(config: PythonToolConfig, iso: Isolation, groups_why: str, passed_over: list[str]) -> None:
    """One line: the mode (for ``auto``: which it picked, and why not the stronger ones), the
    limits, and what the mode leaves open."""
    procs, per_process = budget(config, iso)
    notes = [f"sandbox {iso.mode}"]
    if config.sandbox == "auto":
        why = f" ({'; '.join(passed_over)})" if passed_over else ""
        notes = [f"sandbox auto picked {iso.mode}{why}"]
    if iso.cgroups is not None:
        notes.append(f"a cgroup per run ({config.memory_mb} MB, {procs} processes in all)")
    else:
        notes.append(f"no cgroup per run ({groups_why}): {procs} processes of {per_process} MB each")
    notes.append("seccomp filter on" if iso.seccomp else "no seccomp filter (unknown architecture)")
    if iso.mode == "uid":
        notes.append(
            "shares the host's file system (readable where others may read), process list and IPC; "
            f"sockets and message queues refused{'' if iso.seccomp else ' only with a filter'}; what a "
            f"run leaves in the {len(iso.shared_dirs)} world-writable folders is removed after it "
            "(docs/tools.md: what each mode holds)"
        )
    elif not iso.net_private:
        notes.append("network ON (no network namespace could be made)")
    if iso.mode == "unsafe":
        notes.append(f"code runs as this process's uid ({os.getuid()}): use only for trusted code")
    quiet = iso.mode in ("bwrap", "namespaces") or (iso.mode == "uid" and config.sandbox == "uid")
    (log.info if quiet else log.warning)("python tool: %s", "; ".join(notes))
