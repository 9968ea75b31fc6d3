"""The launcher: the first code a python-tool run executes, before the model's program.

The tool compiles this file once with the run's interpreter and passes the code object, marshalled,
to a one-line ``-I -S -u -c`` bootstrap, with the settings (marshalled too) as the last argument. So
it must import nothing from the project (in a sandbox the package is not visible), and it avoids
modules that are slow to import (json pulls in re and enum: tens of milliseconds per call). It reads
the program from an inherited file descriptor, isolates itself as its mode asks, sets the resource
limits, writes ``main.py`` into its working directory and runs it in the same interpreter, so a call
costs one interpreter start-up. Modes (see ``docs/tools.md``):

* ``bwrap``: bubblewrap already made the namespaces, set ``no_new_privs`` and loaded the seccomp
  filter; the launcher only drops to the run's uid when started as root.
* ``namespaces``: the launcher does what bubblewrap would: new mount, PID, IPC, network, UTS and
  cgroup namespaces (and a user namespace when not root), a fresh root file system with only the
  interpreter and ``/usr`` read-only, a size-capped ``/tmp``, then ``pivot_root``. Process 1 of the
  new PID namespace stays behind as a reaper; the program runs as process 2 without privileges.
* ``uid``: root without namespaces: only the drop to a throw-away uid.
* ``unsafe``: the caller's own uid; limits, the filter and (if possible) a private network only.
"""

import marshal
import os
import resource  # before the uid drop: a C extension the new uid might not be able to read
import select
import sys

PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP = 1, 22, 24
PR_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MNT_DETACH = 1 << 18, 1 << 21, 2
SETUP_FAILED = 113  # exit status: the sandbox could not be built (the message is on stderr)


class Libc:
    """The few libc calls Python does not wrap, raising OSError with the call's name."""

    def __init__(self):
        import ctypes

        self.ct = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def __call__(self, name, *args):
        if getattr(self.lib, name)(*args) != 0:
            err = self.ct.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")

    def mount(self, src, dest, fstype, flags, data=None):
        self("mount", _bytes(src), _bytes(dest), _bytes(fstype), self.ct.c_ulong(flags), _bytes(data))

    def prctl(self, option, value):
        self("prctl", option, self.ct.c_ulong(value), 0, 0, 0)

    def seccomp(self, program: bytes):
        class Fprog(self.ct.Structure):  # type: ignore[name-defined]  # ctypes, loaded after the fork
            _fields_ = [("len", self.ct.c_ushort), ("filter", self.ct.c_char_p)]

        prog = Fprog(len(program) // 8, program)
        self("prctl", PR_SET_SECCOMP, self.ct.c_ulong(2), self.ct.byref(prog), 0, 0)

    def drop_capabilities(self):
        """Empty every capability set: the process keeps its uid but no privilege (user-ns mode)."""
        cap = 0
        while self.lib.prctl(PR_CAPBSET_DROP, self.ct.c_ulong(cap), 0, 0, 0) == 0:
            cap += 1
        header = (self.ct.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        self("capset", header, (self.ct.c_uint32 * 6)())


def _bytes(text):
    return None if text is None else text.encode()


def read_code(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def exit_like(status):
    """Exit as the waited-for child did (a signal becomes 128 + its number)."""
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def reap_until(pid):
    """Reap children (the program's orphans too) until ``pid`` ends, then those that have ended
    since, and exit as ``pid`` did; the caller's cleanup kills whatever still runs."""
    while True:
        done, status = os.wait()
        if done == pid:
            break
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    exit_like(status)


def set_limits(limits):
    for name, value in limits:
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def drop_to(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def mount_flags(path):
    """The flags a read-only remount must keep (a user namespace may not clear locked ones)."""
    f = os.statvfs(path).f_flag
    flags = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    return flags | (MS_RELATIME if f & 4096 else 0)


def unescape(field):
    """A mountinfo field with its octal escapes (``\\040`` for a space) decoded."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def remount_read_only(libc, top):
    points = []
    with open("/newroot/proc/self/mountinfo") as f:
        for line in f:
            point = unescape(line.split()[4])
            if point == top or point.startswith(top + "/"):
                points.append(point)
    for point in points:
        libc.mount(
            None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | mount_flags(point)
        )


def make_path(path, is_dir=True):
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        make_path(parent)
    if is_dir and not os.path.isdir(path):
        os.mkdir(path, 0o755)
    elif not is_dir and not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def bind(libc, src, read_only=True):
    """Bind host path ``src`` (seen under /oldroot) at the same path in the new root."""
    dest = "/newroot" + src
    make_path(dest, os.path.isdir("/oldroot" + src))
    libc.mount("/oldroot" + src, dest, None, MS_BIND | MS_REC)
    if read_only:
        remount_read_only(libc, dest)


def build_root(libc, ns):
    """Make /newroot from /oldroot as bubblewrap does, then pivot into it."""
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    libc.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.chdir("/tmp")
    os.mkdir("newroot", 0o755)
    libc.mount("newroot", "newroot", None, MS_BIND | MS_REC)
    os.mkdir("oldroot", 0o755)
    libc("syscall", ns["pivot_root_nr"], b".", b"oldroot")
    os.chdir("/")
    # the run's writable space first: paths bound below may lie under /tmp
    os.mkdir("/newroot/tmp")
    libc.mount(
        "tmpfs",
        "/newroot/tmp",
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"size={ns['tmp_bytes']},nr_inodes={ns['tmp_inodes']},mode=1777",
    )
    os.mkdir("/newroot/proc")
    libc.mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir("/newroot/dev")
    libc.mount("tmpfs", "/newroot/dev", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    for dev in ns["devices"]:
        bind(libc, "/dev/" + dev, read_only=False)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("shm", "/tmp"),
    ):
        os.symlink(target, "/newroot/dev/" + name)
    for top, link in ns["top"]:
        if link is not None:
            os.symlink(link, "/newroot" + top)
        else:
            bind(libc, top)
    for path in ns["ro"]:
        bind(libc, path)
    libc.mount(None, "/newroot/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    libc.mount(None, "/newroot", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    libc.mount(None, "/oldroot", None, MS_REC | MS_PRIVATE)
    libc("umount2", b"/oldroot", MNT_DETACH)
    os.chdir("/newroot")
    libc("syscall", ns["pivot_root_nr"], b".", b".")
    libc("umount2", b".", MNT_DETACH)
    os.chdir("/")


def enter_namespaces(libc, cfg):
    """Fork into new namespaces; returns in the process that runs the program (PID 2)."""
    ns, user = cfg["ns"], cfg["uid"] is None
    outer_uid, outer_gid = os.getuid(), os.getgid()
    libc(
        "unshare",
        CLONE_NEWNS
        | CLONE_NEWPID
        | CLONE_NEWIPC
        | CLONE_NEWNET
        | CLONE_NEWUTS
        | CLONE_NEWCGROUP
        | (CLONE_NEWUSER if user else 0),
    )
    if user:  # the caller's own uid, mapped to itself; no other uid exists inside
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{outer_uid} {outer_uid} 1"),
            ("gid_map", f"{outer_gid} {outer_gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid:  # outside the new PID namespace: wait, and take process 1 down if we are killed
        os.close(alive_r)
        exit_like(os.waitpid(pid, 0)[1])
    libc.prctl(PR_SET_PDEATHSIG, 9)
    os.close(alive_w)
    if select.select([alive_r], [], [], 0)[0]:  # the parent died before the line above
        os._exit(SETUP_FAILED)
    os.umask(0o022)
    build_root(libc, ns)
    os.chdir(cfg["cwd"])
    child = os.fork()
    if child:  # process 1: reap orphans until the program ends; the kernel then kills the rest
        reap_until(child)
    os.close(alive_r)
    if user:
        libc.drop_capabilities()
    else:
        drop_to(cfg["uid"])


def die_with_parent(libc, parent):
    libc.prctl(PR_SET_PDEATHSIG, 9)
    if os.getppid() != parent:  # the trainer died before the line above
        os._exit(SETUP_FAILED)


def isolate(cfg):
    """Everything before the program: namespaces, uid, limits, no_new_privs, the filter."""
    mode = cfg["mode"]
    libc = Libc() if mode != "bwrap" else None
    if libc is not None:  # the run ends with the trainer (bubblewrap: --die-with-parent)
        die_with_parent(libc, cfg["parent"])
    if mode == "namespaces":
        enter_namespaces(libc, cfg)
    else:
        if cfg["unshare_net"]:
            try:
                libc("unshare", CLONE_NEWNET)
            except OSError:
                sys.stderr.write("sandbox: could not unshare the network\n")
                os._exit(SETUP_FAILED)
        if cfg["uid"] is not None:
            drop_to(cfg["uid"])
            if libc is not None:
                die_with_parent(libc, cfg["parent"])  # a uid change cleared it
        os.chdir(cfg["cwd"])
        if cfg["shield"]:
            # the program's parent is this throw-away process, not the caller; a subreaper, so
            # that orphans of the program do not become the caller's zombies
            libc.prctl(PR_CHILD_SUBREAPER, 1)
            pid = os.fork()
            if pid:
                reap_until(pid)
            die_with_parent(libc, os.getppid())
    set_limits(cfg["limits"])
    if libc is not None:  # bubblewrap has done both
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
        if cfg["seccomp"]:
            libc.seccomp(bytes.fromhex(cfg["seccomp"]))


def main():
    cfg = marshal.loads(bytes.fromhex(sys.argv[-1]))
    src = read_code(cfg["code_fd"])
    try:
        isolate(cfg)
    except OSError as exc:
        sys.stderr.write(f"sandbox: {exc}\n")
        os._exit(SETUP_FAILED)
    with open("main.py", "wb") as f:
        f.write(src)
    site_like(cfg["site"])
    sys.argv = ["main.py"]
    run(src.decode("utf-8", "surrogateescape"))


def site_like(site_cfg):
    """What ``site`` would have done, without its start-up cost: the interpreter was started with
    ``-S`` (its .pth import hooks, which can take tens of milliseconds, are not run), so the path
    it would have had comes from the tool, and exit(), quit() and help() are put back."""
    import site

    sys.path[:] = [os.getcwd(), *site_cfg["path"]]
    sys.prefix, sys.exec_prefix = site_cfg["prefix"], site_cfg["prefix"]
    site.setquit()
    site.sethelper()
    site.setcopyright()


def run(src):
    g = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
    try:
        exec(compile(src, "main.py", "exec"), g)
    except SystemExit:
        raise
    except BaseException as e:
        # the interpreter's own printer: no import (which could fail, e.g. out of file descriptors)
        e.__traceback__ = e.__traceback__.tb_next  # not the launcher's frame
        sys.__excepthook__(type(e), e, e.__traceback__)
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
