"""Throw-away uids for runs started by root, and what a uid leaves behind.

RLIMIT_NPROC does not apply to root, and code running as root may do anything, so a root caller
gives each concurrent run its own unprivileged uid. Leftover processes are then found by uid, and in
the ``uid`` mode (no namespaces) so are the files a run left in the shared temporary directories.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Container
from typing import Optional

from arpo_fast.rollout.tools import hostdirs
from arpo_fast.rollout.tools.reap import Orphans

log = logging.getLogger("arpo_fast.rollout.tools.python")


class UidPoolExhausted(RuntimeError):
    """No run uid became free in time."""


class UidPool:
    """One uid per run in flight, from a range derived from the process id (so that several trainer
    processes on one host never share one: a shared uid would share the process budget and the
    end-of-run sweep). A uid whose processes outlived the sweep is retired until they are gone."""

    BASE = 1_000_000_000
    PER_PROCESS = 512

    def __init__(self):
        self._cond = threading.Condition()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._free = list(range(self.PER_PROCESS))
        self._retired: list[int] = []
        self._base = self.BASE + (self._pid % 4_194_304) * self.PER_PROCESS
        self._fits = _uid_map_allows(self._base + self.PER_PROCESS)
        self._checked: dict[tuple[str, ...], str] = {}

    def collision(self, dirs: tuple[str, ...]) -> str:
        """'' when this pool's uids are its own on this host, else one line saying what else has
        one of them: a user or group in /etc/passwd or /etc/group, a running process, or a file in
        the folders ``dirs``. Such a uid could read that user's files, and the sweep after a run
        would kill their processes and remove their files. Checked once per set of folders."""
        with self._cond:
            if os.getpid() != self._pid:
                self._reset()
            if not self._fits:  # the shared "nobody" of a narrow uid map is never swept
                return ""
            if dirs not in self._checked:
                # the uids out now are ours: their processes and files are runs'
                found = find_owner(frozenset(self._base + i for i in self._free), dirs)
                last = self._base + self.PER_PROCESS - 1
                self._checked[dirs] = (
                    f"the run uids {self._base}-{last} are not free here ({found})" if found else ""
                )
            return self._checked[dirs]

    def acquire(self, timeout_s: float = 30.0) -> int:
        """A free uid; raises :class:`UidPoolExhausted` after ``timeout_s`` without one."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if os.getpid() != self._pid:  # a forked worker must not reuse its parent's uids
                self._reset()
            if not self._fits:  # a container whose uid map is narrow: share "nobody"
                return 65534
            while not self._free:
                self._revive()
                left = deadline - time.monotonic()
                if self._free:
                    break
                if left <= 0:
                    raise UidPoolExhausted(
                        f"no run uid became free within {timeout_s:g} s: {len(self._retired)} of "
                        f"{self.PER_PROCESS} are held by processes that outlived their runs and the "
                        "rest are in use (kill the leftover processes or restart the trainer)"
                    )
                self._cond.wait(min(left, 0.5))
            # oldest released first: a uid rests as long as possible between runs
            return self._base + self._free.pop(0)

    def _revive(self) -> None:
        for uid in list(self._retired):
            reap_uid(uid)  # its leftovers' zombies, where they came back to this process
            if not has_processes(uid):
                self._retired.remove(uid)
                self._free.append(uid - self._base)

    @classmethod
    def shared(cls) -> UidPool:
        """The process's pool: every tool in a process must draw from the same range."""
        global _SHARED
        with _SHARED_LOCK:
            if _SHARED is None:
                _SHARED = cls()
            return _SHARED

    @classmethod
    def is_private(cls, uid: int) -> bool:
        """Whether ``uid`` lies in the range only these pools hand out."""
        return uid >= cls.BASE

    def release(self, uid: int, clean: bool = True) -> None:
        """Give ``uid`` back; one that still has processes (``clean=False``) is retired."""
        with self._cond:
            if self._base <= uid < self._base + self.PER_PROCESS:
                if clean:
                    self._free.append(uid - self._base)
                else:
                    self._retired.append(uid)
                self._cond.notify()


_SHARED: Optional[UidPool] = None
_SHARED_LOCK = threading.Lock()


ACCOUNT_FILES = ("/etc/passwd", "/etc/group")


def find_owner(owners: Container[int], dirs: tuple[str, ...]) -> str:
    """What on this host has an id in ``owners`` ('' for nothing): an account, a process (any of
    its real, effective, saved and file-system uids and gids) or a file in ``dirs``."""
    for path in ACCOUNT_FILES:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split(":")
                    if len(fields) > 2 and fields[2].strip().isdigit() and int(fields[2]) in owners:
                        return f"{path} has {fields[0]!r} with id {int(fields[2])}"
        except OSError:
            continue
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                ids = [int(x) for line in f if line.startswith(("Uid:", "Gid:")) for x in line.split()[1:]]
        except (OSError, ValueError):  # the process ended while we looked
            continue
        held = [i for i in ids if i in owners]
        if held:
            return f"process {pid} runs as {held[0]}"
    for path in hostdirs.owned_entries(dirs, owners, by_group=True):
        return f"{path} is owned by one of them"
    return ""


def _uid_map_allows(uid: int) -> bool:
    """Whether ``uid`` is mapped in this process's user namespace (setuid fails otherwise)."""
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, _, length = (int(x) for x in line.split())
                if inside <= uid < inside + length:
                    return True
    except (OSError, ValueError):
        return True  # no uid map to read: assume the usual full range
    return False


def tasks_of_uid(uid: int) -> int:
    """Threads owned (real uid) by ``uid``, from /proc; RLIMIT_NPROC counts these."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # the process ended while we looked
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


_KILL = shutil.which("kill") or "/bin/kill"


def pids_of(uid: int) -> list[int]:
    """Processes (zombies included) running as ``uid``: one stat per process, cheap enough for
    every call."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    found.append(int(pid))
            except OSError:  # the process ended while we looked
                continue
    return found


def has_processes(uid: int) -> bool:
    """Whether any process (a zombie too) runs as ``uid``."""
    return bool(pids_of(uid))


def reap_uid(uid: int, orphans: Optional[Orphans] = None) -> None:
    """Wait for the zombies of ``uid`` that are this process's children (a private uid's processes
    are all leftovers of runs; see ``reap.py``)."""
    if not UidPool.is_private(uid):
        return
    mine = orphans or Orphans()
    mine.watch(pids_of(uid) if mine.active else ())
    mine.reap()
    if orphans is None:
        mine.close()


def sweep_uid(uid: int, wait_s: float = 2.0, orphans: Optional[Orphans] = None) -> bool:
    """Kill every process left running as ``uid`` (children that escaped the process group) and
    wait for them to be gone; True when none is left. Zombies still count against RLIMIT_NPROC
    until reaped, so a uid is reused only once it is clean; where they come back to this process
    (a subreaper or PID 1), they are reaped here, through ``orphans`` when given.

    Only the pool's private uids are swept: a shared uid such as "nobody" (used where the uid map is
    too narrow) may own processes of other programs on the host, which must never be signalled."""
    if not UidPool.is_private(uid) or not has_processes(uid):
        return True
    reap_uid(uid, orphans)
    try:  # `kill -KILL -1` run as uid signals every process of that uid except itself
        subprocess.run(
            [_KILL, "-KILL", "-1"],
            user=uid,
            group=uid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not sweep leftover processes of uid %d: %s", uid, exc)
    deadline = time.monotonic() + wait_s
    while True:
        reap_uid(uid, orphans)
        if not has_processes(uid):
            return True
        if time.monotonic() > deadline:
            log.warning("processes of uid %d outlived the sweep; that uid is retired", uid)
            return False
        time.sleep(0.01)


def sweep_files(uid: int, dirs: Optional[tuple[str, ...]] = None) -> None:
    """Remove what ``uid`` left in the world-writable folders ``dirs`` (default: the usual ones;
    see ``hostdirs.py``). Only the pool's private uids are swept."""
    if UidPool.is_private(uid):
        hostdirs.remove_owned(uid, dirs)
