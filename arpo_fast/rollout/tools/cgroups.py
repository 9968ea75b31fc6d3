"""One cgroup per python-tool run: a memory and a process limit on the run as a whole.

Resource limits (``setrlimit``) are per process, so 64 processes may each take the per-process
memory, and memory held in tmpfs files or shared memory counts against no process at all. A memory
cgroup counts all of it (anonymous memory, page cache, tmpfs and shared memory pages, kernel memory
such as open files), and a pids cgroup counts every task the run makes.

cgroup v2 is used where its ``memory`` and ``pids`` controllers can be delegated to a folder this
process makes; otherwise cgroup v1's ``memory`` and ``pids`` hierarchies (hosts and CI machines that
still mount v1). A run joins its cgroup before it starts: the command is prefixed with a shell line
that writes its own pid into each ``cgroup.procs`` and then ``exec``\\s the sandbox (see
:meth:`RunCgroup.wrap`). Without a writable cgroup file system (an unprivileged user, most
containers) :func:`detect` returns None with the reason, and the tool falls back to per-process
budgets (``docs/tools.md``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import threading
import time
from typing import Optional

log = logging.getLogger("arpo_fast.rollout.tools.python")

_JOIN = 'while [ "$1" != -- ]; do echo $$ >"$1" || exit 125; shift; done; shift; exec "$@"'
JOIN_FAILED = 125
"""Exit status of a run that could not join its cgroup."""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fs type, super options) of every cgroup file system."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                out.append((fields[3], fields[4].replace("\\040", " "), rfields[0], rfields[2]))
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, and under ``""`` its v2 cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _under(mount_root: str, mount_point: str, path: str) -> str:
    rel = os.path.relpath(path, mount_root) if mount_root != "/" else path.lstrip("/")
    return os.path.normpath(os.path.join(mount_point, rel)) if rel != "." else mount_point


class CgroupParent:
    """This process's folder(s) of run cgroups; :meth:`create` makes one per run."""

    def __init__(self, version: int, folders: dict[str, str]):
        self.version = version
        self.folders = folders  # controller ("memory", "pids"; "" for v2) -> folder we made
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._stale: list[RunCgroup] = []
        atexit.register(self.close)

    def create(self, memory_bytes: int, pids: int) -> RunCgroup:
        """A fresh cgroup for one run with its limits set; raises OSError when that fails."""
        with self._lock:
            name = f"run-{next(self._names)}"
            stale, self._stale = self._stale, []
        for old in stale:  # runs whose cgroup was still busy when they ended: one more try each
            old.remove(quiet=True, attempts=1)
        dirs = {c: os.path.join(folder, name) for c, folder in self.folders.items()}
        run = RunCgroup(self, dirs)
        try:
            for d in dirs.values():
                os.mkdir(d)
            if self.version == 2:
                _write(os.path.join(dirs[""], "memory.max"), str(memory_bytes))
                _try_write(os.path.join(dirs[""], "memory.swap.max"), "0")
                _write(os.path.join(dirs[""], "pids.max"), str(pids))
            else:
                _write(os.path.join(dirs["memory"], "memory.limit_in_bytes"), str(memory_bytes))
                # swap counts too where swap accounting is on
                _try_write(os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes"), str(memory_bytes))
                _write(os.path.join(dirs["pids"], "pids.max"), str(pids))
        except OSError:
            run.remove(quiet=True)
            raise
        return run

    def close(self) -> None:
        with self._lock:
            stale, self._stale = self._stale, []
        for old in stale:
            old.remove(quiet=True, later=False, attempts=1)
        for folder in self.folders.values():
            try:
                os.rmdir(folder)
            except OSError:
                pass


def _try_write(path: str, value: str) -> None:
    try:
        _write(path, value)
    except OSError:  # the file is absent where that accounting is off
        pass


class RunCgroup:
    """The cgroup(s) of one run."""

    def __init__(self, parent: CgroupParent, dirs: dict[str, str]):
        self.parent, self.dirs = parent, dirs

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` prefixed so that it joins this cgroup before it runs (one ``sh``, ~1 ms)."""
        procs = [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]
        return ["/bin/sh", "-c", _JOIN, "sh", *procs, "--", *cmd]

    def _main(self) -> str:
        return self.dirs.get("") or self.dirs["pids"]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in _read(os.path.join(self._main(), "cgroup.procs")).split()]
        except OSError:
            return []

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the run for going over the memory limit."""
        path = (
            os.path.join(self.dirs[""], "memory.events")
            if "" in self.dirs
            else os.path.join(self.dirs["memory"], "memory.oom_control")
        )
        try:
            fields = dict(line.split() for line in _read(path).splitlines() if line.strip())
        except (OSError, ValueError):
            return False
        return int(fields.get("oom_kill", 0)) > 0

    def kill_all(self, wait_s: float = 2.0) -> bool:
        """SIGKILL every process in the run's cgroup; True once it is empty."""
        kill_file = os.path.join(self.dirs.get("", ""), "cgroup.kill")
        if "" in self.dirs and os.path.exists(kill_file):
            _try_write(kill_file, "1")
        deadline = time.monotonic() + wait_s
        while True:
            pids = self.pids()
            if not pids:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in pids:
                _kill_member(pid, self._main())
            time.sleep(0.005)

    def remove(self, quiet: bool = False, later: bool = True, attempts: int = 20) -> bool:
        """Remove the run's cgroup(s), waiting up to about a second for exiting tasks; a busy one is
        retried at the next run (``later``), and at exit."""
        left = False
        for d in self.dirs.values():
            for attempt in range(attempts):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: a task is still exiting
                    time.sleep(0.005 * (attempt + 1))
            else:
                left = True
        if left and later:
            with self.parent._lock:
                self.parent._stale.append(self)
            if not quiet:
                log.warning("python tool: cgroup %s is still busy; it is removed later", self._main())
        return not left


def _kill_member(pid: int, cgroup_dir: str) -> None:
    """Kill ``pid`` only if it still is in ``cgroup_dir`` (a pidfd pins the process, so a
    recycled pid of an unrelated process is never signalled)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        members = _read(os.path.join(cgroup_dir, "cgroup.procs")).split()
        if str(pid) in members:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def detect() -> tuple[Optional[CgroupParent], str]:
    """A folder for per-run cgroups (v2 if delegable, else v1), or None and why not."""
    try:
        mounts, own = _mounts(), _own_paths()
    except OSError as exc:
        return None, f"cannot read this process's cgroups ({exc})"
    tag = f"arpo_fast-{os.getpid()}"
    reasons = []
    for make in (_make_v2, _make_v1):
        try:
            parent = make(mounts, own, tag)
        except OSError as exc:
            reasons.append(str(exc))
            continue
        if parent is not None:
            try:  # prove that a run cgroup can be made and limited here
                parent.create(64 << 20, 8).remove()
                return parent, ""
            except OSError as exc:
                reasons.append(f"cgroup v{parent.version}: {exc}")
                parent.close()
    return None, "; ".join(reasons) or "no memory and pids cgroup controllers are mounted"


def _remove_stale(base: str) -> None:
    """Remove the run cgroups of trainer processes that died without cleaning up (empty ones only:
    rmdir refuses a cgroup that still holds a process)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid = name[len("arpo_fast-") :]
        if not name.startswith("arpo_fast-") or not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        folder = os.path.join(base, name)
        for run in os.listdir(folder) if os.path.isdir(folder) else []:
            if run.startswith("run-"):
                try:
                    os.rmdir(os.path.join(folder, run))
                except OSError:
                    pass
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _make_v2(mounts, own, tag) -> Optional[CgroupParent]:
    for root, point, fstype, _ in mounts:
        if fstype != "cgroup2" or "" not in own:
            continue
        try:
            available = _read(os.path.join(point, "cgroup.controllers")).split()
        except OSError:
            continue
        if not {"memory", "pids"} <= set(available):
            continue
        mine = _under(root, point, own[""])
        # runs go beside the trainer (a cgroup holding processes cannot delegate controllers)
        base = os.path.dirname(mine) if mine != point else point
        enabled = _read(os.path.join(base, "cgroup.subtree_control")).split()
        if not {"memory", "pids"} <= set(enabled):
            _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
        folder = os.path.join(base, tag)
        _remove_stale(base)
        os.makedirs(folder, exist_ok=True)
        try:
            _write(os.path.join(folder, "cgroup.subtree_control"), "+memory +pids")
        except OSError:
            os.rmdir(folder)
            raise
        return CgroupParent(2, {"": folder})
    return None


def _make_v1(mounts, own, tag) -> Optional[CgroupParent]:
    folders = {}
    try:
        for controller in ("memory", "pids"):
            for root, point, fstype, options in mounts:
                if fstype == "cgroup" and controller in options.split(",") and controller in own:
                    folder = os.path.join(_under(root, point, own[controller]), tag)
                    _remove_stale(os.path.dirname(folder))
                    os.makedirs(folder, exist_ok=True)
                    folders[controller] = folder
                    break
            else:
                raise LookupError(controller)
    except (OSError, LookupError) as exc:
        for folder in folders.values():
            os.rmdir(folder)
        if isinstance(exc, OSError):
            raise
        return None
    return CgroupParent(1, folders)
