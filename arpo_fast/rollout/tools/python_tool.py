"""The ``python`` tool: run model-written code in an isolated, limited process and report its output.

Model code is hostile input. Each call runs in a sandbox chosen once per process (``sandbox.py``
describes the modes; ``docs/tools.md`` lists what each guarantees), never with the trainer's
privileges unless ``sandbox="unsafe"`` asks for that by name. Each call gets its own size-capped
working directory, a wall-clock limit enforced by killing the whole process group or PID namespace,
limits on memory, processes, open files and disk for the run as a whole, a seccomp filter, and
output read through pipes with a cap while draining, so 100 MB of printing never sits in memory.
"""

from __future__ import annotations

import logging
import marshal
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from arpo_fast.rollout.tools import choice, interpreter, sandbox
from arpo_fast.rollout.tools.base import ToolResult
from arpo_fast.rollout.tools.cgroups import RunCgroup
from arpo_fast.rollout.tools.fs import remove_tree
from arpo_fast.rollout.tools.reap import Orphans
from arpo_fast.rollout.tools.run import ProgramRun, bytes_fd, code_fd
from arpo_fast.rollout.tools.sandbox import Isolation, budget
from arpo_fast.rollout.tools.uids import UidPoolExhausted, sweep_files, sweep_uid, tasks_of_uid

log = logging.getLogger("arpo_fast.rollout.tools.python")
LAUNCHER = Path(__file__).with_name("launcher.py").read_text()
_BOOT = "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv[1])))"
SANDBOX_OVERHEAD_PROCESSES = 2
"""Tasks of the sandbox itself in a run's cgroup (bubblewrap's two, or the launcher's two)."""


@dataclass
class PythonToolConfig:
    """Limits and isolation of the python tool. Limits are per run (all of its processes) unless
    they say otherwise."""

    timeout_s: float = 10.0
    """Wall-clock limit per call; the CPU-time limit is set just above it as a backstop."""
    memory_mb: int = 2048
    """Memory of the whole run: its processes, its files in /tmp, shared memory (a cgroup, where
    this process may make one). Each process's address space is capped at this too."""
    max_processes: int = 64
    """Processes and threads of the whole run."""
    process_memory_mb: int = 256
    """Without a per-run cgroup: each process's address-space limit. The run then gets at most
    memory_mb // process_memory_mb processes, so that processes x memory stays within memory_mb."""
    max_open_files: int = 256
    """Open files per process (RLIMIT_NOFILE)."""
    max_file_mb: int = 64
    """Largest file the code may write (RLIMIT_FSIZE)."""
    max_disk_mb: int = 256
    """Size of the run's writable directory (/tmp, also its working directory and /dev/shm) in the
    bwrap and namespaces modes; the uid and unsafe modes write to the host's disk, uncapped."""
    max_output_chars: int = 4000
    """Characters returned to the model, all notes and error lines included."""
    kill_after_output_bytes: int = 1 << 20
    """Stop the program once it has printed this much: the rest would be thrown away anyway."""
    max_code_chars: int = 100_000
    """Longest call accepted, in characters (about 25k tokens, more than a response usually holds).
    Checked before anything else reads the call: a longer one reads back an error at once, so a
    huge call neither stalls the trainer's thread nor takes its memory."""
    error_lines: int = 6
    """How many last lines of the error (stderr) are returned when the code fails."""
    sandbox: str = "auto"
    """``auto`` (the strongest that works here), ``bwrap``, ``namespaces``, ``uid`` (root only), or
    ``unsafe`` (the trainer's own uid: only for code you trust)."""
    python: str = field(default_factory=lambda: sys.executable)
    """Interpreter that runs the code; its installation is visible read-only inside the sandbox."""
    extra_ro_paths: tuple[str, ...] = ()
    """More host paths to show read-only inside the sandbox (e.g. a data directory)."""
    tmp_root: Optional[str] = None
    """Where the uid and unsafe modes make each run's directory (default: the system's temporary
    directory); the other modes keep it in memory."""
    name: str = "python"

    def __post_init__(self):
        if self.sandbox == "none":
            raise ValueError(
                "sandbox='none' is gone: use 'auto' (isolated without bubblewrap too) "
                "or, to run model code as your own user, 'unsafe'"
            )
        if self.sandbox not in sandbox.MODES:
            raise ValueError(f"sandbox must be one of {', '.join(sandbox.MODES)}; got {self.sandbox!r}")
        for key in (
            "timeout_s",
            "memory_mb",
            "max_processes",
            "process_memory_mb",
            "max_open_files",
            "max_file_mb",
            "max_disk_mb",
            "max_output_chars",
            "kill_after_output_bytes",
            "max_code_chars",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.max_open_files < 16:
            raise ValueError(
                f"max_open_files must be at least 16 (the interpreter needs some), got {self.max_open_files}"
            )
        if self.error_lines < 0:
            raise ValueError(f"error_lines must be >= 0, got {self.error_lines}")
        self.extra_ro_paths = tuple(os.path.abspath(p) for p in self.extra_ro_paths)
        missing = [p for p in self.extra_ro_paths if not os.path.exists(p)]
        if missing:
            raise ValueError(f"extra_ro_paths: {missing[0]} does not exist")
        if not (os.path.isfile(self.python) and os.access(self.python, os.X_OK)):
            raise ValueError(f"python: {self.python!r} is not an executable file")
        if self.tmp_root is not None and not os.path.isdir(self.tmp_root):
            raise ValueError(f"tmp_root: {self.tmp_root!r} is not a directory")


def check_config(config: PythonToolConfig) -> None:
    """What a trainer checks before anything slow: that a sandbox this config asks for works here
    (the probe's result is kept, so the tool built later does not probe again)."""
    choice.choose(config, execute, announce=False)


_LANG = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_+-")


def unfence(body: str) -> str:
    """The inside of a markdown fence that wraps all of ``body`` (```` ```lang ```` on the first
    line, ```` ``` ```` at the end), else ``body``. One linear scan: a backtracking regex for this
    is quadratic in runs of whitespace, and model text may be long."""
    start = len(body) - len(body.lstrip())
    if not body.startswith("```", start):
        return body
    newline = body.find("\n", start + 3)
    if newline < 0 or not set(body[start + 3 : newline].rstrip(" \t")) <= _LANG:
        return body
    end = len(body.rstrip())
    if end - 3 < newline + 1 or not body.startswith("```", end - 3):
        return body
    return body[newline + 1 : end - 3].rstrip()


def dedent(text: str) -> str:
    """``textwrap.dedent`` with string methods only: the same result, a few times faster on long
    whitespace runs (its regular expressions backtrack over them), and linear."""
    lines = [line if line.strip(" \t") else "" for line in text.split("\n")]
    indents = [line[: len(line) - len(line.lstrip(" \t"))] for line in lines if line]
    margin = os.path.commonprefix(indents) if indents else ""
    if not margin:
        return "\n".join(lines)
    return "\n".join(line[len(margin) :] for line in lines)


def clean_code(body: str) -> str:
    """The code inside a call: markdown fences and common indentation removed."""
    return dedent(unfence(body).strip("\r\n")).strip()


class PythonTool:
    """Runs code with limits in a sandbox; see :class:`PythonToolConfig`. Thread-safe: calls may
    overlap. Raises :class:`SandboxUnavailable` (a ValueError) when made where no asked-for
    sandbox works, with one line saying what to do; a call never raises."""

    def __init__(self, config: Optional[PythonToolConfig] = None):
        self.config = config or PythonToolConfig()
        self.name = self.config.name
        self.isolation = choice.choose(self.config, execute)

    @property
    def mode(self) -> str:
        """``bwrap``, ``namespaces``, ``uid`` or ``unsafe``: how runs are isolated here."""
        return self.isolation.mode

    def __call__(self, query: str) -> ToolResult:
        cap = self.config.max_output_chars
        if len(query) > self.config.max_code_chars:  # before any parsing: O(1), nothing copied
            return ToolResult(
                f"The code is {len(query):,} characters long, more than the limit of "
                f"{self.config.max_code_chars:,}; it was not run."[:cap],
                "bad_input",
            )
        try:
            code = clean_code(query)
            if not code:
                return ToolResult("No code to run: the call was empty."[:cap], "bad_input")
            if "\x00" in code:
                return ToolResult("The code contains a NUL character and cannot be run."[:cap], "bad_input")
            return execute(self.config, self.isolation, code)
        except UidPoolExhausted as exc:  # an expected condition: one line, no traceback
            log.warning("python tool: a call was not run: %s", exc)
            return ToolResult(f"The code could not be run: {exc}"[:cap], "sandbox_error")
        except Exception as exc:  # a tool never raises into the rollout
            log.exception("python tool: a call failed")
            return ToolResult(f"The code could not be run: {exc}"[:cap], "sandbox_error")


def _limits(config: PythonToolConfig, iso: Isolation) -> list[tuple[str, int]]:
    procs, per_process_mb = budget(config, iso)
    if iso.mode == "unsafe" and not sandbox.is_root():
        # the caller's own uid: its other threads count against RLIMIT_NPROC too
        procs += tasks_of_uid(os.getuid())
    return [
        ("RLIMIT_AS", per_process_mb << 20),
        ("RLIMIT_CPU", int(math.ceil(config.timeout_s)) + 1),
        ("RLIMIT_FSIZE", config.max_file_mb << 20),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NOFILE", config.max_open_files),
        ("RLIMIT_NPROC", procs),
    ]


def _env(cwd: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": cwd,
        "TMPDIR": cwd,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MPLBACKEND": "Agg",
        # one thread per math library: threads count against the process limit
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _site(python: str) -> dict:
    info = interpreter.info(python)
    return {"path": [p for p in info["path"] if p], "prefix": info["prefix"]}


def command(config: PythonToolConfig, iso: Isolation, uid: Optional[int], cwd: str, fds: dict) -> list[str]:
    """The command line of one run (before the cgroup prefix); ``fds``: the program's descriptor
    (``code``) and, for bubblewrap, the filter's (``seccomp``) and the info pipe's (``info``)."""
    tmp_bytes = config.max_disk_mb << 20
    settings = {
        "mode": iso.mode,
        "code_fd": fds["code"],
        "limits": _limits(config, iso),
        "uid": uid,
        "parent": os.getpid(),
        "cwd": cwd,
        "unshare_net": iso.mode in ("uid", "unsafe") and iso.net_private,
        "shield": iso.mode == "unsafe",
        "seccomp": iso.seccomp.hex() if iso.seccomp and iso.mode != "bwrap" else "",
        "ns": (
            sandbox.namespace_settings(iso.python, config.extra_ro_paths, tmp_bytes)
            if iso.mode == "namespaces"
            else None
        ),
        "site": _site(iso.python),
    }
    # -S: the launcher sets the path itself (see launcher.site_like); -u: what was printed before
    # a timeout or a crash still reaches the model
    cmd = [
        iso.python,
        "-I",
        "-S",
        "-u",
        "-c",
        _BOOT,
        interpreter.compiled(iso.python, LAUNCHER).hex(),
        marshal.dumps(settings).hex(),
    ]
    if iso.mode == "bwrap":
        bwrap = sandbox.bwrap_command(
            iso.python, config.extra_ro_paths, tmp_bytes, fds.get("seccomp"), fds.get("info")
        )
        cmd = bwrap + cmd
    return cmd


def execute(config: PythonToolConfig, iso: Isolation, code: str) -> ToolResult:
    """One run of ``code``: set up its uid, directory and cgroup, run it, clean up after it."""
    procs, process_mb = budget(config, iso)
    held = _Held(iso, iso.uids.acquire(max(30.0, config.timeout_s)) if iso.uids else None)
    try:
        cwd = sandbox.RUN_DIR
        if iso.mode in ("uid", "unsafe"):  # no mount namespace: a directory on the host
            held.workdir = cwd = tempfile.mkdtemp(prefix="arpo_py_", dir=config.tmp_root)
            if held.uid is not None:
                os.chown(held.workdir, held.uid, held.uid)
        held.fds["code"] = code_fd(code)
        if iso.mode == "bwrap" and iso.seccomp:
            held.fds["seccomp"] = bytes_fd(iso.seccomp)
        info_fd = None
        if iso.mode == "bwrap" and held.orphans.active:  # its init may come back to us: learn its pid
            info_fd, held.fds["info"] = os.pipe()
            held.fds["info_read"] = info_fd
        cmd = command(config, iso, held.uid, cwd, held.fds)
        if iso.cgroups is not None:
            held.group = iso.cgroups.create(config.memory_mb << 20, procs + SANDBOX_OVERHEAD_PROCESSES)
            cmd = held.group.wrap(cmd)
        passed = tuple(fd for name, fd in held.fds.items() if name != "info_read")
        run = ProgramRun(config, cmd, _env(cwd), passed, process_mb, held.orphans, info_fd)
        rc = run.execute()
        return run.result(rc, over_memory=held.group is not None and held.group.oom_killed())
    finally:
        held.release()


@dataclass
class _Held:
    """What one run holds, given back by :meth:`release` whatever happened."""

    iso: Isolation
    uid: Optional[int]
    workdir: Optional[str] = None
    group: Optional[RunCgroup] = None
    fds: dict[str, int] = field(default_factory=dict)
    orphans: Orphans = field(default_factory=Orphans)
    """Where the trainer is a subreaper or PID 1: the run's processes that may end as its zombies."""

    def release(self) -> None:
        """The cgroup emptied and removed, the uid swept (in the uid mode the shared temporary
        folders too), orphans reaped, the host directory removed. The uid goes back to the pool
        only if clean."""
        for fd in self.fds.values():
            os.close(fd)
        clean = True
        if self.group is not None:
            self.orphans.watch(self.group.pids() if self.orphans.active else ())
            clean = self.group.kill_all()
            self.group.remove()
        if self.uid is not None and self.iso.mode == "uid":  # no PID namespace took them down
            clean = sweep_uid(self.uid, orphans=self.orphans) and clean
            sweep_files(self.uid, self.iso.shared_dirs)
        self.orphans.reap(wait_s=1.0)
        self.orphans.close()
        if self.uid is not None and self.iso.uids is not None:
            self.iso.uids.release(self.uid, clean)
        if self.workdir is not None:
            remove_tree(self.workdir)
