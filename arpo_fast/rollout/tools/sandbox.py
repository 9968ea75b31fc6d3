"""How the python tool isolates a run: the modes, the choice among them, the command that starts a run.

Model-written code is hostile, so a run never has the trainer's privileges unless the user asked for
that by name (``sandbox="unsafe"``). Modes, strongest first (``docs/tools.md`` gives each one's
guarantees in numbers):

* ``bwrap``: bubblewrap makes the namespaces and loads the seccomp filter.
* ``namespaces``: the same layout built by the launcher itself (``launcher.py``), for machines
  without bubblewrap: root needs nothing more, another user needs unprivileged user namespaces.
* ``uid``: root where no namespace can be made (a container without ``CAP_SYS_ADMIN``): the run gets
  a throw-away uid and an interpreter that uid can read, but shares the host's file system, network
  and IPC; what it leaves in the shared temporary folders is removed after it.
* ``unsafe``: the trainer's own uid, with resource limits and the filter only.

``auto`` takes the first of bwrap, namespaces and (as root) uid that works here; when none does, it
refuses with one line saying how to install bubblewrap and how to opt out. In every mode the run's
processes share one cgroup (memory and process limits for the run as a whole) where the machine lets
this process make one (see ``cgroups.py``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

from arpo_fast.rollout.tools import cgroups, interpreter, seccomp
from arpo_fast.rollout.tools.uids import UidPool

log = logging.getLogger("arpo_fast.rollout.tools.python")

MODES = ("auto", "bwrap", "namespaces", "uid", "unsafe")
RUN_DIR = "/tmp"
"""The run's working directory (and HOME, TMPDIR) inside bwrap and namespaces: a size-capped tmpfs."""
DEVICES = ("null", "zero", "full", "random", "urandom")
TOP_DIRS = ("bin", "lib", "lib64", "lib32", "sbin")
HOW_TO_FIX = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora/RHEL: dnf install "
    "bubblewrap; Arch: pacman -S bubblewrap), or run model code as your own user at your "
    "own risk with sandbox='unsafe' (trainer: --tool-settings "
    '\'{"python": {"sandbox": "unsafe"}}\')'
)


class SandboxUnavailable(ValueError):
    """The asked-for isolation cannot be had on this machine (a setting that does not fit it)."""


def is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class Isolation:
    """How runs are isolated here, decided once per process and interpreter."""

    mode: str
    python: str
    """The interpreter runs start: the configured one, or in the ``uid`` mode a copy others can read."""
    uids: Optional[UidPool] = None
    cgroups: Optional[cgroups.CgroupParent] = None
    net_private: bool = True
    seccomp: Optional[bytes] = None
    notes: list[str] = field(default_factory=list)
    shared_dirs: tuple[str, ...] = ()
    """The uid mode: the host's world-writable folders, swept of what each run's uid left there."""


def budget(config, iso: Isolation) -> tuple[int, int]:
    """(processes, address-space MB per process) of a run under ``config`` (a PythonToolConfig):
    with a cgroup the run's totals are enforced as such; without one they are split so that their
    product stays within memory_mb."""
    if iso.cgroups is not None:
        return config.max_processes, config.memory_mb
    procs = max(1, min(config.max_processes, config.memory_mb // config.process_memory_mb))
    return procs, config.memory_mb // procs


def candidates(asked: str) -> list[str]:
    """The modes to try, in order, for the ``sandbox`` setting ``asked``."""
    if asked == "auto":
        return ["bwrap", "namespaces"] + (["uid"] if is_root() else [])
    return [asked]


def why_not(mode: str, python: str) -> Optional[str]:
    """Why ``mode`` cannot work here before trying it, or None."""
    if mode == "bwrap" and shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if mode == "uid" and not is_root():
        return "the uid mode needs root (it runs code as a throw-away uid)"
    if mode == "namespaces" and not is_root() and not _userns_allowed():
        return "this kernel does not allow unprivileged user namespaces"
    return None


def _userns_allowed() -> bool:
    for path, bad in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
    ):
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return False
        except OSError:
            continue
    return True


_CGROUPS: dict[int, tuple] = {}


def run_cgroups() -> tuple[Optional[cgroups.CgroupParent], str]:
    """This process's cgroup folder for runs (made once), or None and why."""
    if os.getpid() not in _CGROUPS:
        _CGROUPS[os.getpid()] = cgroups.detect()
    return _CGROUPS[os.getpid()]


# -- commands -------------------------------------------------------------------------------------


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def read_only_paths(python: str, extra_ro: tuple[str, ...]) -> list[str]:
    """Host paths shown read-only in a sandbox: the interpreter's roots and the user's extras."""
    return [*interpreter.roots(python), *extra_ro]


def top_dirs() -> list[tuple[str, Optional[str]]]:
    """``/usr`` and ``/bin``, ``/lib``... as the host has them: (path, symlink target or None)."""
    out: list[tuple[str, Optional[str]]] = [("/usr", None)]
    for top in TOP_DIRS:
        path = "/" + top
        if os.path.islink(path):
            out.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            out.append((path, None))
    return out


def bwrap_command(
    python: str,
    extra_ro: tuple[str, ...],
    tmp_bytes: int,
    seccomp_fd: Optional[int],
    info_fd: Optional[int] = None,
) -> list[str]:
    """The bubblewrap command line: read-only interpreter and /usr, a size-capped /tmp as the only
    writable place (it is also the run's directory), a minimal /dev, and nothing else. ``info_fd``:
    where bubblewrap writes the pid of its namespace's init (see ``reap.py``)."""
    cmd = [
        "bwrap",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
    ]
    if not is_root():
        cmd.append("--unshare-user")  # unprivileged bwrap needs a user namespace
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        cmd += ["--info-fd", str(info_fd)]
    cmd += _mounts(python, extra_ro, tmp_bytes)
    # the root and /dev are tmpfs without a size: nobody may write there
    cmd += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", RUN_DIR]
    return cmd


def _mounts(python: str, extra_ro: tuple[str, ...], tmp_bytes: int) -> list[str]:
    """bubblewrap's mounts: /proc, the capped /tmp, the minimal /dev, the top-level directories and
    the read-only paths the interpreter needs, each with readable parents."""
    # /tmp first: an interpreter or venv that lives under /tmp is bound on top of it below
    cmd = [
        "--proc",
        "/proc",
        "--perms",
        "1777",
        "--size",
        str(tmp_bytes),
        "--tmpfs",
        "/tmp",
        "--perms",
        "0755",
        "--size",
        "65536",
        "--tmpfs",
        "/dev",
    ]
    for dev in DEVICES:
        cmd += ["--dev-bind", f"/dev/{dev}", f"/dev/{dev}"]
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("shm", "/tmp"),
    ):
        cmd += ["--symlink", target, f"/dev/{name}"]
    for path, link in top_dirs():
        cmd += ["--symlink", link, path] if link is not None else ["--ro-bind", path, path]
    made = {"/usr", "/tmp", "/dev", "/proc", *("/" + t for t in TOP_DIRS)}
    for root in read_only_paths(python, extra_ro):
        for parent in _ancestors(root):
            if parent not in made:  # bwrap would create parents 0700: unreadable after setuid
                cmd += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        if root not in made:
            cmd += ["--ro-bind", root, root]
            made.add(root)
    return cmd


def namespace_settings(python: str, extra_ro: tuple[str, ...], tmp_bytes: int) -> dict:
    """What the launcher needs to build the same layout as :func:`bwrap_command` itself."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine, os.uname().machine)
    pivot = seccomp.syscall_number("pivot_root", machine) if machine in seccomp.ARCHES else None
    if pivot is None:
        raise SandboxUnavailable(f"the namespaces mode does not know this machine ({machine})")
    ro = [p for p in read_only_paths(python, extra_ro) if os.path.exists(p)]
    return {
        "top": top_dirs(),
        "ro": sorted(ro),
        "devices": DEVICES,
        "tmp_bytes": tmp_bytes,
        "tmp_inodes": max(4096, tmp_bytes >> 14),
        "pivot_root_nr": pivot,
    }
