"""How the python tool isolates a run: bubblewrap when it works here, resource limits always.

Two modes, picked once per process by a probe (see ``docs/tools.md`` for what each enforces):

* ``bwrap``: bubblewrap gives the run its own mount, PID, network, IPC and UTS namespaces. Only the
  interpreter's files are visible (read-only), ``/tmp`` is private, the work directory is the only
  writable path, and when the sandbox's first process ends the kernel kills everything in it.
* ``limits``: no namespaces (bwrap missing or refused by the kernel); the same resource limits, a
  fresh directory, and, when the OS allows it, a private network namespace.

In both modes a *launcher* (Python code passed with ``-c``) sets the resource limits, drops to an
unprivileged uid when started as root, and then runs the user's code in the same interpreter, so a
call costs one interpreter start-up. RLIMIT_NPROC is not enforced for root, which is why a root
caller hands each concurrent run its own throw-away uid: the process-count limit then applies per
run, and leftover processes can be swept by uid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from functools import lru_cache
from typing import Optional

log = logging.getLogger("arpo_fast.rollout.tools.python")

WORKDIR_IN_SANDBOX = "/sandbox"
CLONE_NEWNET = 0x40000000

# Runs inside the child. Kept free of project imports: in bwrap mode the package is not visible.
LAUNCHER = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["limits"]:
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["unshare_net"]:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).unshare(cfg["unshare_net"]) != 0:
        sys.stderr.write("sandbox: could not unshare the network\n")
        sys.exit(112)
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
os.chdir(cfg["cwd"])
if cfg["shield"]:
    # the code's parent is this throw-away process, not the caller: killing it ends only this run
    pid = os.fork()
    if pid:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os._exit(code if code >= 0 else 128 - code)
del json, resource, cfg
sys.argv = ["main.py"]
sys.path.insert(0, os.getcwd())
with open("main.py", encoding="utf-8", errors="surrogateescape") as f:
    src = f.read()
g = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
try:
    exec(compile(src, "main.py", "exec"), g)
except SystemExit:
    raise
except BaseException as e:
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.stderr.flush()
    os._exit(1)
"""


def is_root() -> bool:
    return os.geteuid() == 0


@lru_cache(maxsize=8)
def interpreter_roots(python: str) -> tuple[str, ...]:
    """Directories an interpreter needs: its install prefix, a virtualenv's prefix, its binary's."""
    out = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    roots = {os.path.realpath(p) for p in out[:2] if p}
    roots.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    roots.add(os.path.dirname(os.path.abspath(python)))
    # a venv's bin/python is a symlink; its own directory must exist inside too
    roots.add(os.path.dirname(os.path.dirname(os.path.abspath(python))))
    roots = {r for r in roots if r not in ("/", "/usr") and not r.startswith("/usr/")}
    # a root inside another root is already visible through the outer bind
    return tuple(sorted(r for r in roots if not any(r.startswith(o + "/") for o in roots)))


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


def bwrap_command(python: str, workdir: str, extra_ro: tuple[str, ...] = ()) -> list[str]:
    """The bubblewrap command line that runs ``python`` with ``workdir`` as the only writable dir."""
    cmd = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if not is_root():
        cmd.append("--unshare-user")  # unprivileged bwrap needs a user namespace
    # The private /tmp comes first: an interpreter or venv that lives under /tmp is bound on top of it
    # below (mounts are made in argument order), instead of being hidden by it.
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("bin", "lib", "lib64", "lib32", "sbin"):
        path = "/" + top
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    made = {"/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/tmp"}
    for root in (*interpreter_roots(python), *extra_ro):
        for parent in _ancestors(root):
            if parent not in made:  # bwrap would create parents 0700: unreadable after setuid
                cmd += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        if root not in made:
            cmd += ["--ro-bind", root, root]
            made.add(root)
    cmd += ["--bind", workdir, WORKDIR_IN_SANDBOX, "--chdir", WORKDIR_IN_SANDBOX]
    return cmd


class UidPool:
    """Throw-away uids for concurrent runs when the caller is root, one per run in flight.

    Built from the process id so that several trainer processes on one host do not share uids
    (a shared uid would share the process-count budget and the end-of-run sweep).
    """

    BASE = 1_000_000_000
    PER_PROCESS = 512

    def __init__(self):
        self._cond = threading.Condition()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._free = list(range(self.PER_PROCESS))
        self._base = self.BASE + (self._pid % 4_194_304) * self.PER_PROCESS
        self._fits = _uid_map_allows(self._base + self.PER_PROCESS)

    def acquire(self) -> int:
        with self._cond:
            if os.getpid() != self._pid:  # a forked worker must not reuse its parent's uids
                self._reset()
            if not self._fits:  # a container whose uid map is narrow: share "nobody"
                return 65534
            while not self._free:
                self._cond.wait()
            # oldest released first: a uid rests as long as possible between runs
            return self._base + self._free.pop(0)

    @classmethod
    def is_private(cls, uid: int) -> bool:
        """Whether ``uid`` lies in the range only these pools hand out."""
        return uid >= cls.BASE

    def release(self, uid: int) -> None:
        with self._cond:
            if self._base <= uid < self._base + self.PER_PROCESS:
                self._free.append(uid - self._base)
                self._cond.notify()


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


def has_processes(uid: int) -> bool:
    """Whether any process runs as ``uid`` (one stat per process: cheap enough for every call)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    return True
            except OSError:  # the process ended while we looked
                continue
    return False


def sweep_uid(uid: int, wait_s: float = 2.0) -> bool:
    """Kill every process left running as ``uid`` (children that escaped the process group) and
    wait for them to be gone; True when none is left. Zombies still count against RLIMIT_NPROC
    until reaped, so a uid is reused only once it is clean.

    Only the pool's private uids are swept: a shared uid such as "nobody" (used where the uid map is
    too narrow) may own processes of other programs on the host, which must never be signalled."""
    if not UidPool.is_private(uid):
        return True
    if not has_processes(uid):
        return True
    try:  # `kill -KILL -1` run as uid signals every process of that uid except itself
        subprocess.run([_KILL, "-KILL", "-1"], user=uid, group=uid, extra_groups=[],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not sweep leftover processes of uid %d: %s", uid, exc)
    deadline = time.monotonic() + wait_s
    while has_processes(uid):
        if time.monotonic() > deadline:
            log.warning("processes of uid %d outlived the sweep; that uid is retired", uid)
            return False
        time.sleep(0.01)
    return True


def launcher_args(limits: list[tuple[str, int]], cwd: str, uid: Optional[int],
                  unshare_net: bool, shield: bool) -> list[str]:
    """Interpreter arguments that run the launcher; ``shield`` puts a throw-away parent process
    between the caller and the code (used when they share a uid and no PID namespace)."""
    cfg = {"limits": limits, "cwd": cwd, "uid": uid, "shield": shield,
           "unshare_net": CLONE_NEWNET if unshare_net else 0}
    # -u: what was printed before a timeout or a crash still reaches the model
    return ["-I", "-u", "-c", LAUNCHER, json.dumps(cfg)]
