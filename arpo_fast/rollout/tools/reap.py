"""Reaping what a run leaves when the trainer is PID 1 or a child subreaper (a container's
entrypoint, or under a supervisor that sets ``PR_SET_CHILD_SUBREAPER``).

A process whose parent dies is handed to the nearest subreaper above it, else to PID 1. Runs leave
such orphans: bubblewrap's init of the PID namespace, children that escaped the run's session,
processes killed at the end of a run. Where the trainer is that subreaper, each one stays a zombie
until the trainer waits for it: zombies of a run's uid keep that uid retired (its pool runs dry),
and every zombie holds a pid (a container's pid limit ends the job).

Only processes seen as part of a run are ever waited for: each is held by a pidfd from the moment
it was seen, so a recycled pid is never mistaken for it, and children the trainer started in other
ways (data loader workers, compile workers) are never touched: their owners wait for them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import time
from collections.abc import Iterable
from typing import Optional

PR_GET_CHILD_SUBREAPER = 37


@functools.cache
def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def is_reaper() -> bool:
    """Whether orphans of this process's descendants come back to it (asked of the kernel each
    time: code in this process may make it a subreaper after it started)."""
    if os.getpid() == 1:
        return True
    flag = ctypes.c_int(0)
    libc = _libc()
    if libc is None or libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
        return False
    return flag.value != 0


class Orphans:
    """Processes of one run that may end up as this process's children; :meth:`reap` waits for
    those that do. Inactive (watches nothing) where this process is no reaper: orphans then go to
    the machine's init, which reaps them."""

    def __init__(self, active: Optional[bool] = None):
        self.active = hasattr(os, "P_PIDFD") and (is_reaper() if active is None else active)
        self._fds: dict[int, int] = {}

    def watch(self, pids: Iterable[int]) -> None:
        """Hold ``pids`` (processes of the run, alive or zombies now) by pidfd."""
        if not self.active:
            return
        for pid in pids:
            if pid in self._fds or pid == os.getpid():
                continue
            try:
                self._fds[pid] = os.pidfd_open(pid)
            except OSError:  # already gone
                continue

    def reap(self, wait_s: float = 0.0) -> int:
        """Wait for each watched process that is (or within ``wait_s`` becomes) this process's
        child and has exited; forget the ones that are gone. Returns how many were reaped; the
        others stay watched until :meth:`close`."""
        reaped = 0
        deadline = time.monotonic() + wait_s
        while self._fds:
            for pid, fd in list(self._fds.items()):
                state = _try_reap(fd)
                if state != "pending":
                    reaped += state == "reaped"
                    os.close(self._fds.pop(pid))
            if not self._fds or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        return reaped

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _try_reap(fd: int) -> str:
    """``reaped``, ``gone`` (reaped by its own parent) or ``pending`` (still running, or not yet
    handed to this process)."""
    try:
        if os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG) is not None:
            return "reaped"
        return "pending"  # our child, still running
    except ChildProcessError:  # not our child (yet): gone, or its parent has not died so far
        try:
            signal.pidfd_send_signal(fd, 0)
        except OSError:  # ProcessLookupError: reaped by whoever was its parent
            return "gone"
        return "pending"
    except OSError:  # no P_PIDFD here (a kernel older than 5.4): nothing can be done safely
        return "gone"


def group_members(pgid: int) -> list[int]:
    """Processes in the process group ``pgid`` (zombies included), from /proc."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if int(fields[2]) == pgid:
            found.append(int(name))
    return found
