"""The ``python`` tool: run model-written code in a separate, limited process and report its output.

Each call gets a fresh temporary directory (removed afterwards), a wall-clock limit enforced by
killing the whole process group or PID namespace, CPU/memory/process/file-size limits, and output read
through pipes with a cap while draining, so 100 MB of printing never sits in memory. Isolation is
described in :mod:`arpo_fast.rollout.tools.sandbox` and ``docs/tools.md``.
"""

from __future__ import annotations

import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from arpo_fast.rollout.tools import sandbox
from arpo_fast.rollout.tools.base import ToolResult

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_+-]*[ \t]*\n(.*?)\n?\s*```\s*$", re.DOTALL)


@dataclass
class PythonToolConfig:
    """Limits and isolation of the python tool."""

    timeout_s: float = 10.0
    """Wall-clock limit per call; the CPU-time limit is set just above it as a backstop."""
    memory_mb: int = 2048
    """Address-space limit (RLIMIT_AS). Importing numpy needs a few hundred MB of it."""
    max_processes: int = 64
    """Process/thread limit (RLIMIT_NPROC), counted per run (see docs/tools.md)."""
    max_file_mb: int = 64
    """Largest file the code may write (RLIMIT_FSIZE)."""
    max_output_chars: int = 4000
    """Output shown to the model; longer output is cut, with a note saying so."""
    kill_after_output_bytes: int = 1 << 20
    """Stop the program once it has printed this much: the rest would be thrown away anyway."""
    error_lines: int = 6
    """How many last lines of the error (stderr) are returned when the code fails."""
    sandbox: str = "auto"
    """``auto`` (bubblewrap if it works here, else limits only), ``bwrap`` (required) or ``none``."""
    python: str = field(default_factory=lambda: sys.executable)
    """Interpreter that runs the code; its installation is visible read-only inside the sandbox."""
    extra_ro_paths: tuple[str, ...] = ()
    """More host paths to show read-only inside the bubblewrap sandbox (e.g. a data directory)."""
    tmp_root: Optional[str] = None
    """Where the per-call directories are made (default: the system temporary directory)."""
    name: str = "python"

    def __post_init__(self):
        if self.sandbox not in ("auto", "bwrap", "none"):
            raise ValueError(f"sandbox must be 'auto', 'bwrap' or 'none', got {self.sandbox!r}")
        for key in ("timeout_s", "memory_mb", "max_processes", "max_file_mb", "max_output_chars",
                    "kill_after_output_bytes"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        self.extra_ro_paths = tuple(os.path.abspath(p) for p in self.extra_ro_paths)


def clean_code(body: str) -> str:
    """The code inside a call: markdown fences and common indentation removed."""
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    return textwrap.dedent(body.strip("\r\n")).strip()


class PythonTool:
    """Runs code with limits; see :class:`PythonToolConfig`. Thread-safe: calls may overlap."""

    def __init__(self, config: Optional[PythonToolConfig] = None):
        self.config = config = config or PythonToolConfig()
        self.name = config.name
        self._uids = sandbox.UidPool() if sandbox.is_root() else None
        self._mode: Optional[str] = None
        self._net_private = False
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        """``bwrap`` or ``limits``: how runs are isolated here (probed on first use)."""
        with self._lock:
            if self._mode is None:
                self._mode, self._net_private, drop_uid = _probe(self.config, self._uids)
                if not drop_uid:
                    self._uids = None
            return self._mode

    def __call__(self, query: str) -> ToolResult:
        code = clean_code(query)
        if not code:
            return ToolResult("No code to run: the call was empty.", "bad_input")
        if "\x00" in code:
            return ToolResult("The code contains a NUL character and cannot be run.", "bad_input")
        mode = self.mode
        uid = self._uids.acquire() if self._uids else None
        workdir = tempfile.mkdtemp(prefix="arpo_py_", dir=self.config.tmp_root)
        try:
            _write_code(workdir, code, uid)
            run = _Run(self.config, self._command(mode, workdir, uid), workdir, uid)
            return run.execute()
        except OSError as exc:  # e.g. bwrap vanished after the probe, or the disk is full
            return ToolResult(f"The code could not be started: {exc}", "sandbox_error")
        finally:
            # in bwrap the PID namespace already took every process down
            if uid is not None and (mode == "bwrap" or sandbox.sweep_uid(uid)):
                self._uids.release(uid)
            shutil.rmtree(workdir, ignore_errors=True)

    def _command(self, mode: str, workdir: str, uid: Optional[int]) -> list[str]:
        cfg = self.config
        limits = [("RLIMIT_AS", cfg.memory_mb << 20),
                  ("RLIMIT_CPU", int(math.ceil(cfg.timeout_s)) + 1),
                  ("RLIMIT_FSIZE", cfg.max_file_mb << 20),
                  ("RLIMIT_CORE", 0),
                  ("RLIMIT_NPROC", _nproc_limit(cfg.max_processes, mode, uid))]
        if mode == "bwrap":
            prefix = sandbox.bwrap_command(cfg.python, workdir, cfg.extra_ro_paths)
            cwd, net = sandbox.WORKDIR_IN_SANDBOX, False  # bwrap already unshared the network
        else:
            prefix, cwd, net = [], workdir, self._net_private
        shield = mode != "bwrap" and uid is None
        return prefix + [cfg.python] + sandbox.launcher_args(limits, cwd, uid, net, shield)


def _nproc_limit(max_processes: int, mode: str, uid: Optional[int]) -> int:
    if uid is not None or mode == "bwrap" or sandbox.is_root():
        # a throw-away uid or a fresh user namespace: counted per run; as root: not enforced at all
        return max_processes
    # same uid as the caller and no namespace: the caller's own threads count against the limit
    return sandbox.tasks_of_uid(os.getuid()) + max_processes


def _write_code(workdir: str, code: str, uid: Optional[int]) -> None:
    path = os.path.join(workdir, "main.py")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(code)
    if uid is not None:  # the run's unprivileged uid owns its directory and nothing else
        os.chown(workdir, uid, uid)
        os.chown(path, uid, uid)
    os.chmod(workdir, 0o700)


def _child_env(workdir: str, mode: str) -> dict[str, str]:
    home = sandbox.WORKDIR_IN_SANDBOX if mode == "bwrap" else workdir
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp" if mode == "bwrap"
            else workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "MPLBACKEND": "Agg",
            # one thread per math library: threads count against the process limit
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Run:
    """One started process: drains both pipes with caps, enforces the deadline, builds the result."""

    def __init__(self, config: PythonToolConfig, cmd: list[str], workdir: str, uid: Optional[int]):
        self.config, self.cmd, self.workdir, self.uid = config, cmd, workdir, uid
        self.stdout = bytearray()
        self.stderr_tail = bytearray()
        self.printed = 0
        self.reason = ""  # set when we stopped the program: "timeout" or "output_limit"

    def execute(self) -> ToolResult:
        start = time.monotonic()
        mode = "bwrap" if self.cmd[0] == "bwrap" else "limits"
        proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=self.workdir,
                                env=_child_env(self.workdir, mode), start_new_session=True)
        try:
            self._drain(proc, start + self.config.timeout_s)
        finally:
            _kill_group(proc)
            proc.stdout.close()
            proc.stderr.close()
        rc = proc.wait()
        return self._result(rc, time.monotonic() - start)

    def _drain(self, proc: subprocess.Popen, deadline: float) -> None:
        keep = self.config.max_output_chars * 4 + 4  # enough bytes for the shown characters
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            exited_at = None
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    self.reason = "timeout"
                    return
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.2:
                    return  # a leftover child holds the pipes open; the run is over
                for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    self.printed += len(chunk)
                    if key.data == "out":
                        self.stdout += chunk[:max(0, keep - len(self.stdout))]
                    else:
                        self.stderr_tail = (self.stderr_tail + chunk)[-16384:]
                if self.printed > self.config.kill_after_output_bytes:
                    self.reason = "output_limit"
                    return

    def _result(self, rc: int, elapsed: float) -> ToolResult:
        cfg = self.config
        out = self.stdout.decode("utf-8", "replace")
        truncated = len(out) > cfg.max_output_chars or self.reason == "output_limit"
        out = out[:cfg.max_output_chars]
        if truncated:
            out += (f"\n[output cut: only the first {cfg.max_output_chars} characters are shown; "
                    f"the program printed {'more than ' if self.reason else ''}{self.printed} bytes"
                    + (" and was stopped]" if self.reason == "output_limit" else "]"))
        info = {"returncode": rc, "printed_bytes": self.printed}
        if self.reason == "timeout":
            text = f"Timed out after {cfg.timeout_s:g} s (the time limit); the program was stopped."
            return ToolResult(_join(out, text), "timeout", elapsed, truncated, info)
        if self.reason == "output_limit" or rc == 0:
            text = out if out.strip() else "The code ran and printed nothing (use print() to show results)."
            return ToolResult(text, "ok", elapsed, truncated, info)
        return ToolResult(_join(out, self._error_text(rc)), "error", elapsed, truncated, info)

    def _error_text(self, rc: int) -> str:
        err = self.stderr_tail.decode("utf-8", "replace").rstrip()
        lines = [ln for ln in err.splitlines() if ln.strip()][-self.config.error_lines:]
        text = "\n".join(lines)
        signum = -rc if rc < 0 else (rc - 128 if rc > 128 else 0)
        if signum:
            text = _join(text, f"The program was killed by signal {_signal_name(signum)}"
                               f"{_signal_hint(signum, self.config)}.")
        elif not text:
            text = f"The program exited with status {rc}."
        # The hints look at the whole captured tail, not only the last lines kept: when many forked
        # processes fail at once, their tracebacks interleave and the error line may sit higher up.
        if "MemoryError" in err:
            text += f"\n(The memory limit is {self.config.memory_mb} MB.)"
        if "BlockingIOError" in err or "Resource temporarily unavailable" in err:
            text += f"\n(The limit is {self.config.max_processes} processes and threads.)"
        return text


def _join(first: str, second: str) -> str:
    return f"{first}\n{second}" if first.strip() else second


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _signal_hint(signum: int, cfg: PythonToolConfig) -> str:
    if signum == signal.SIGXCPU:
        return f" (CPU time limit of {int(math.ceil(cfg.timeout_s)) + 1} s)"
    if signum == signal.SIGXFSZ:
        return f" (file size limit of {cfg.max_file_mb} MB)"
    return ""


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the run's session; in bwrap mode this takes the PID namespace down with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_PROBE_LOCK = threading.Lock()
_PROBED: dict[tuple, tuple[str, bool, bool]] = {}
# touches the standard library's directory: fails when the interpreter is unreadable after setuid
_PROBE_CODE = "import traceback, socket, json\nprint(1)"


def _probe(config: PythonToolConfig, uids: Optional[sandbox.UidPool]) -> tuple[str, bool, bool]:
    """Pick (mode, private network, drop to a throw-away uid) once per process and interpreter,
    and log the choice once."""
    key = (config.sandbox, config.python, config.extra_ro_paths)
    with _PROBE_LOCK:
        if key not in _PROBED:
            _PROBED[key] = _probe_uncached(config, uids)
        return _PROBED[key]


def _probe_uncached(config: PythonToolConfig,
                    uids: Optional[sandbox.UidPool]) -> tuple[str, bool, bool]:
    probe = PythonToolConfig(**{**config.__dict__, "timeout_s": 30.0})
    why = "bubblewrap was not asked for (sandbox='none')"
    if config.sandbox != "none":
        if shutil.which("bwrap") is None:
            why = "bubblewrap (bwrap) is not installed"
        else:
            ok, why = _try(probe, "bwrap", uids, False)
            if ok:
                sandbox.log.info("python tool: bubblewrap sandbox (namespaces + resource limits)")
                return "bwrap", True, uids is not None
            why = f"bubblewrap does not work here: {why}"
        if config.sandbox == "bwrap":
            raise RuntimeError(f"sandbox='bwrap' was asked for but {why}")
    drop = uids is not None and _try(probe, "limits", uids, False)[0]
    net = _try(probe, "limits", uids if drop else None, True)[0]
    notes = [why, "resource limits and a temporary directory only",
             "network off" if net else "network ON (no network namespace could be made)"]
    if uids is not None and not drop:
        notes.append(f"code runs as root: {config.python} or the work directory's parent is not "
                     "accessible to an unprivileged user, so the process limit and file permissions "
                     "do not apply")
    (sandbox.log.info if config.sandbox == "none" else sandbox.log.warning)(
        "python tool: %s", "; ".join(notes))
    return "limits", net, drop


def _try(config: PythonToolConfig, mode: str, uids, net: bool) -> tuple[bool, str]:
    """Run ``print(1)`` through the launcher in ``mode``; say whether it worked and why not."""
    tool = PythonTool.__new__(PythonTool)
    tool.config, tool._uids, tool._net_private = config, None, net
    uid = uids.acquire() if uids else None
    workdir = tempfile.mkdtemp(prefix="arpo_probe_", dir=config.tmp_root)
    try:
        _write_code(workdir, _PROBE_CODE, uid)
        cmd = tool._command(mode, workdir, uid)
        done = subprocess.run(cmd, capture_output=True, timeout=config.timeout_s, cwd=workdir,
                              env=_child_env(workdir, mode))
        if done.returncode == 0 and done.stdout.strip() == b"1":
            return True, ""
        return False, done.stderr.decode("utf-8", "replace").strip()[-300:] or f"exit {done.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    finally:
        if uid is not None and sandbox.sweep_uid(uid):
            uids.release(uid)
        shutil.rmtree(workdir, ignore_errors=True)
