"""One started run of the python tool: drain its pipes with caps, enforce the deadline, and turn
what it printed into the text the model reads, never longer than ``max_output_chars``."""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import time
from typing import Optional

from arpo_fast.rollout.tools.base import ToolResult
from arpo_fast.rollout.tools.cgroups import JOIN_FAILED
from arpo_fast.rollout.tools.launcher import SETUP_FAILED
from arpo_fast.rollout.tools.reap import Orphans, group_members

STDERR_KEPT = 16384
"""Bytes of the end of stderr kept (the error lines are taken from these)."""
LINE_KEPT = 1024
"""Bytes kept of the start of each stderr line: an error line starts with what went wrong."""


class ProgramRun:
    """One execution of the python tool's program: start ``cmd``, collect its output within the caps
    and the deadline, build the result."""

    def __init__(
        self,
        config,
        cmd: list[str],
        env: dict[str, str],
        pass_fds: tuple[int, ...],
        process_mb: int,
        orphans: Optional[Orphans] = None,
        info_fd: Optional[int] = None,
    ):
        self.config, self.cmd, self.env, self.pass_fds = config, cmd, env, pass_fds
        self.process_mb = process_mb  # each process's address-space limit
        self.orphans = orphans or Orphans(active=False)
        self.info_fd = info_fd  # bubblewrap's --info-fd: the pid of the namespace's init
        self._info = bytearray()
        self.stdout = bytearray()
        self.stderr_tail = bytearray()
        self._line = bytearray()  # the stderr line being read, its first LINE_KEPT bytes
        self._line_cut = False
        self.printed = 0
        self.reason = ""  # set when we stopped the program: "timeout" or "output_limit"
        self.started = 0.0

    def execute(self) -> int:
        """Run to the end (or the deadline); return the exit status."""
        self.started = time.monotonic()
        proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
            env=self.env,
            start_new_session=True,
            pass_fds=self.pass_fds,
        )
        try:
            self._drain(proc, self.started + self.config.timeout_s)
        finally:
            self.orphans.watch(group_members(proc.pid) if self.orphans.active else ())
            kill_group(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        return proc.wait()

    def _drain(self, proc: subprocess.Popen, deadline: float) -> None:
        keep = self.config.max_output_chars * 4 + 4  # enough bytes for the shown characters
        with selectors.DefaultSelector() as sel:
            assert proc.stdout is not None and proc.stderr is not None  # both are pipes
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            if self.info_fd is not None:
                sel.register(self.info_fd, selectors.EVENT_READ, "info")
            streams = {"out", "err"}
            exited_at = None
            while streams:
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
                    if key.data == "info":
                        self._take_info(chunk, sel)
                        continue
                    if not chunk:
                        sel.unregister(key.fileobj)
                        streams.discard(key.data)
                        continue
                    self.printed += len(chunk)
                    if key.data == "out":
                        self.stdout += chunk[: max(0, keep - len(self.stdout))]
                    else:
                        self._take_stderr(chunk)
                if self.printed > self.config.kill_after_output_bytes:
                    self.reason = "output_limit"
                    return

    def _take_info(self, chunk: bytes, sel: selectors.BaseSelector) -> None:
        """bubblewrap's JSON ``{"child-pid": N}``, written at start: N (its namespace's init)
        is held at once, while it is surely the run's own process."""
        self._info += chunk[: 4096 - len(self._info)]
        try:
            pid = json.loads(self._info).get("child-pid")
        except (ValueError, AttributeError):
            pid = None
        if isinstance(pid, int):
            self.orphans.watch([pid])
        if (pid is not None or not chunk or len(self._info) >= 4096) and self.info_fd is not None:
            sel.unregister(self.info_fd)

    def _take_stderr(self, chunk: bytes) -> None:
        for i, part in enumerate(chunk.split(b"\n")):
            if i:
                self._end_line(b"\n")
            room = LINE_KEPT - len(self._line)
            self._line += part[: max(0, room)]
            self._line_cut |= len(part) > room

    def _end_line(self, end: bytes) -> None:
        self.stderr_tail += self._line + (b" [... cut]" if self._line_cut else b"") + end
        del self.stderr_tail[:-STDERR_KEPT]
        self._line, self._line_cut = bytearray(), False

    def result(self, rc: int, over_memory: bool = False) -> ToolResult:
        """The model's view of the run; ``over_memory``: the cgroup's OOM killer stopped it."""
        cfg = self.config
        elapsed = time.monotonic() - self.started
        self._end_line(b"")
        out = self.stdout.decode("utf-8", "replace")
        info = {"returncode": rc, "printed_bytes": self.printed}
        stopped = self.reason == "output_limit"
        if self.reason == "timeout":
            status = "timeout"
            tail = f"Timed out after {cfg.timeout_s:g} s (the time limit); the program was stopped."
        elif stopped or rc == 0:
            status, tail = "ok", ""
        elif (rc == SETUP_FAILED and self.stderr_tail.startswith(b"sandbox: ")) or (
            rc == JOIN_FAILED and self.stderr_tail.startswith(b"sh: ")
        ):
            first = self.stderr_tail.decode("utf-8", "replace").splitlines()[0]
            status, tail = "sandbox_error", f"The sandbox could not be set up: {first}"
        else:
            status, tail = "error", error_text(self.stderr_tail, rc, cfg, over_memory, self.process_mb)
        text, truncated = compose(out, self.printed, stopped, tail, cfg.max_output_chars)
        if status == "ok" and not out.strip():
            text = "The code ran and printed nothing (use print() to show results)."
            text = text[: cfg.max_output_chars]
        return ToolResult(text, status, elapsed, truncated, info)


def compose(out: str, printed: int, stopped: bool, tail: str, cap: int) -> tuple[str, bool]:
    """stdout, cut with a note when it does not fit, followed by ``tail`` (an error or timeout
    message); the whole is at most ``cap`` characters. Returns (text, whether stdout was cut)."""
    if tail:
        tail = clip_lines(tail, cap - min(len(out) + 1, cap // 2))
    room = cap - (len(tail) + 1 if tail else 0)
    truncated = stopped or len(out) > room
    if truncated:
        shown = max(0, room - len(_cut_note(room, printed, stopped)))
        out = out[:shown] + _cut_note(shown, printed, stopped)
    text = f"{out}\n{tail}" if out.strip() and tail else (tail or out)
    return text[:cap], truncated


def _cut_note(shown: int, printed: int, stopped: bool) -> str:
    return (
        f"\n[output cut: only the first {shown} characters are shown; the program printed "
        f"{'more than ' if stopped else ''}{printed} bytes{' and was stopped' if stopped else ''}]"
    )


def clip_lines(text: str, budget: int) -> str:
    """``text`` within ``budget`` characters: over-long lines cut in the middle of their content
    (their start, which names the error, is kept), then the earliest lines dropped."""
    if len(text) <= budget:
        return text
    lines = text.split("\n")
    width = max(40, budget // len(lines))
    lines = [ln if len(ln) <= width else ln[: width - 13] + " [... cut]" for ln in lines]
    while len(lines) > 1 and len("\n".join(lines)) > budget:
        lines.pop(0)
    return "\n".join(lines)[-budget:] if budget > 0 else ""


def error_text(stderr_tail: bytes | bytearray, rc: int, cfg, over_memory: bool, process_mb: int) -> str:
    """The last ``error_lines`` lines of stderr, plus what stopped the program and a hint when a
    limit was the cause."""
    err = bytes(stderr_tail).decode("utf-8", "replace").rstrip()
    lines = [ln for ln in err.splitlines() if ln.strip()][-cfg.error_lines :]
    text = "\n".join(lines)
    signum = -rc if rc < 0 else (rc - 128 if rc > 128 else 0)
    if signum:
        text = _join(
            text, f"The program was killed by signal {_signal_name(signum)}{_signal_hint(signum, cfg)}."
        )
    elif not text:
        text = f"The program exited with status {rc}."
    # The hints look at the whole captured tail, not only the last lines kept: when many forked
    # processes fail at once, their tracebacks interleave and the error line may sit higher up.
    if over_memory:
        text += (
            f"\n(The run went over its memory limit of {cfg.memory_mb} MB, counted over all of "
            "its processes and files.)"
        )
    elif "MemoryError" in err:
        per_process = f"{process_mb} MB per process, " if process_mb < cfg.memory_mb else ""
        text += f"\n(The memory limit is {per_process}{cfg.memory_mb} MB for the run.)"
    if "BlockingIOError" in err or "Resource temporarily unavailable" in err:
        text += f"\n(The limit is {cfg.max_processes} processes and threads.)"
    if "Too many open files" in err:
        text += f"\n(The limit is {cfg.max_open_files} open files per process.)"
    if "File too large" in err:
        text += f"\n(The largest file the run may write is {cfg.max_file_mb} MB.)"
    if "No space left on device" in err:
        text += f"\n(The run may write {cfg.max_disk_mb} MB of files in all.)"
    return text


def _join(first: str, second: str) -> str:
    return f"{first}\n{second}" if first.strip() else second


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _signal_hint(signum: int, cfg) -> str:
    if signum == signal.SIGXCPU:
        return f" (CPU time limit of {int(math.ceil(cfg.timeout_s)) + 1} s)"
    if signum == signal.SIGXFSZ:
        return f" (file size limit of {cfg.max_file_mb} MB)"
    return ""


def kill_group(proc: subprocess.Popen) -> None:
    """Kill the run's session; bwrap and the namespaces mode take their PID namespace with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def code_fd(code: str) -> int:
    """An in-memory file holding the program, for the launcher to read (no file on disk)."""
    fd = os.memfd_create("arpo-code", os.MFD_CLOEXEC)
    data = code.encode("utf-8", "surrogateescape")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def bytes_fd(data: bytes) -> int:
    """A pipe's read end holding ``data`` (small: it must fit the pipe's buffer)."""
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return r
