"""What each sandbox mode keeps out: the trainer's privileges, the host's memory, processes, files
and disk, the kernel's riskier interfaces, and leftovers that reach the next call. Each test runs in
every mode available here; one runs the tool as an unprivileged caller."""

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from python_tool_modes import SANDBOXES, make_tool, params, unavailable

from arpo_fast.rollout.tools import choice, interpreter, sandbox, uids
from arpo_fast.rollout.tools.fs import remove_tree
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
from arpo_fast.rollout.tools.uids import UidPool, UidPoolExhausted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the trainer's uid must differ)")


@pytest.fixture(scope="module", params=params())
def tool(request):
    return make_tool(request, request.param, timeout_s=10)


def _json(result) -> dict:
    assert result.ok, result.text
    return json.loads(result.text)


# -- 1. never the trainer's privileges --------------------------------------------------------

_PRIVILEGES = """
import json, os
out = {"uid": os.getuid(), "euid": os.geteuid()}
def attempt(name, fn):
    try:
        fn()
        out[name] = "DONE"
    except OSError as e:
        out[name] = type(e).__name__
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("signal", lambda: os.kill(TRAINER, 0))
attempt("environ", lambda: open(f"/proc/{TRAINER}/environ", "rb").read())
attempt("memory", lambda: open(f"/proc/{TRAINER}/mem", "rb"))
attempt("write", lambda: open(CANARY, "w").write("x"))
out["no_new_privs"] = "NoNewPrivs:\\t1" in open("/proc/self/status").read()
print(json.dumps(out))
"""


def _privileges_code(canary: str) -> str:
    return f"TRAINER = {os.getpid()}\nCANARY = {canary!r}\n" + _PRIVILEGES


@needs_root
def test_code_never_runs_with_the_trainers_privileges(tool, tmp_path):
    out = _json(tool(_privileges_code(str(tmp_path / "canary"))))
    assert out["uid"] != os.getuid() and out["euid"] != os.getuid() and out["uid"] != 0
    assert out["uid"] == out["euid"] and UidPool.is_private(out["uid"])
    assert all(out[k] != "DONE" for k in ("shadow", "signal", "environ", "memory", "write")), out
    assert out["no_new_privs"] and not (tmp_path / "canary").exists()


@needs_root
@pytest.mark.parametrize("hidden", [("bwrap",), ("bwrap", "namespaces")])
def test_auto_without_bubblewrap_still_isolates(monkeypatch, request, tmp_path, hidden):
    """A fresh machine: no bwrap, the default interpreter (here a pyenv under /root that other
    users cannot read); auto must still drop the trainer's privileges."""
    monkeypatch.setattr(choice, "_CHOSEN", {})
    real_why_not = sandbox.why_not
    monkeypatch.setattr(
        sandbox,
        "why_not",
        lambda mode, python: "hidden by the test" if mode in hidden else real_why_not(mode, python),
    )
    tool = make_tool(request, "auto", timeout_s=10)
    assert tool.isolation.mode == ("namespaces" if hidden == ("bwrap",) else "uid")
    out = _json(tool(_privileges_code(str(tmp_path / "canary"))))
    assert out["uid"] != 0 and all(out[k] != "DONE" for k in ("shadow", "signal", "environ", "write"))


def test_setuid_programs_give_nothing_back(tool):
    """no_new_privs: a set-uid root program started by the code keeps the code's uid."""
    folder = tempfile.mkdtemp(prefix="arpo_suid_")
    try:
        os.chmod(folder, 0o755)
        program = os.path.join(folder, "id")
        shutil.copy("/usr/bin/id", program)
        os.chmod(program, 0o4755)
        if os.statvfs(folder).f_flag & os.ST_NOSUID or os.stat(program).st_uid != 0:
            pytest.skip("no set-uid root program can be made here")
        t = PythonTool(PythonToolConfig(sandbox=tool.mode, extra_ro_paths=(folder,)))
        result = t(
            f"import subprocess\nprint(subprocess.run([{program!r}], capture_output=True, text=True).stdout)"
        )
        assert result.ok and "uid=" in result.text and "euid=0" not in result.text, result.text
    finally:
        shutil.rmtree(folder)


# -- 2. the run as a whole is bounded ----------------------------------------------------------

_HOLDERS = """
import os, time
kids = []
for _ in range(6):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        try:
            block = bytearray(100 << 20)  # zero-filled, so every page is touched
        except MemoryError:
            os._exit(1)
        time.sleep(4)
        os._exit(0)
    kids.append(pid)
time.sleep(2.5)
held = 0
for pid in kids:
    if os.waitpid(pid, os.WNOHANG) == (0, 0):
        held += int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) >= 90_000
print(held)
"""


def test_memory_is_counted_over_the_whole_run(tool, request):
    """Six processes of 100 MB each against memory_mb=300: at most three hold theirs at once
    (a cgroup counts them together; without one, the process budget keeps the product in bounds)."""
    result = make_tool(request, tool.mode, memory_mb=300, timeout_s=15)(_HOLDERS)
    held = int(result.text.split()[0]) if result.ok else 0
    assert held * 100 <= 300, result.text


@pytest.mark.parametrize("where", ["/tmp/big", "/dev/shm/big", "big"])
def test_files_are_capped_in_total(tool, request, where):
    """Six 64 MB files against max_disk_mb=128: the rest fails, and nothing escapes via /dev/shm."""
    if tool.mode == "uid":
        pytest.skip("the uid mode writes to the host's disk: no total cap (docs/tools.md)")
    t = make_tool(request, tool.mode, max_disk_mb=128)
    code = textwrap.dedent(f"""
        written = 0
        try:
            for i in range(6):
                with open("{where}" + str(i), "wb") as f:
                    for _ in range(64):
                        f.write(b"x" * (1 << 20))
                        written += 1
        finally:
            print(written)
    """)
    result = t(code)
    assert result.status == "error" and "No space left on device" in result.text
    assert int(result.text.split()[0]) <= 128 and "may write 128 MB" in result.text


def test_files_in_memory_count_against_the_memory_limit(tool, request):
    if tool.isolation.cgroups is None:
        pytest.skip("no cgroup here: files are bounded by max_disk_mb only")
    if tool.mode == "uid":
        pytest.skip("the uid mode's files are on the host's disk")
    t = make_tool(request, tool.mode, memory_mb=128, max_disk_mb=1024, max_file_mb=1024)
    code = (
        "written = 0\ntry:\n    with open('/tmp/f', 'wb') as f:\n        for _ in range(384):\n"
        "            f.write(b'x' * (1 << 20)); f.flush(); written += 1\n"
        "finally:\n    print(written, flush=True)"
    )
    result = t(code)
    assert result.status == "error" and "SIGKILL" in result.text
    assert "memory limit of 128 MB" in result.text
    assert not result.text.split()[0].isdigit() or int(result.text.split()[0]) < 128


def test_memfd_and_system_v_memory_are_refused(tool):
    code = textwrap.dedent("""
        import ctypes, errno, os
        try:
            os.memfd_create("x")
            print("memfd made")
        except OSError as e:
            print(errno.errorcode[e.errno])
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.shmget(0, 256 << 20, 0o1600), errno.errorcode[ctypes.get_errno()])
    """)
    assert tool(code).text.split() == ["ENOSYS", "-1", "ENOSYS"]


def test_open_files_are_capped(tool):
    result = tool("fs = []\nwhile True:\n    fs.append(open('/dev/null'))")
    assert result.status == "error" and "Too many open files" in result.text
    assert "256 open files per process" in result.text


def test_tmpdir_is_writable_and_capped(tool):
    code = (
        "import os, tempfile\nfd, path = tempfile.mkstemp()\nos.write(fd, b'x')\n"
        "print(os.path.dirname(path) == os.environ['TMPDIR'] == os.getcwd())"
    )
    assert tool(code).text == "True\n"


# -- 3. cleanup and leftovers -----------------------------------------------------------------


def test_a_deep_tree_is_cleaned_up(tool):
    code = "import os\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')"
    result = tool(code)
    assert result.ok and result.text == "deep\n"
    assert os.listdir(tool.config.tmp_root) == []


_LEAVE = """
import os, socket
for folder in ("/tmp", "/var/tmp", "/dev/shm", "."):
    try:
        open(os.path.join(folder, "arpo_left_MARK"), "w").write("x")
    except OSError:
        pass
try:  # the uid mode refuses sockets
    socket.socket(socket.AF_UNIX).bind("/tmp/arpo_sock_MARK")
except PermissionError:
    pass
print("left")
"""
_LOOK = """
import os
print(sorted(p for f in ("/tmp", "/var/tmp", "/dev/shm", ".") if os.path.isdir(f)
             for p in os.listdir(f) if "MARK" in p))
"""


def test_nothing_reaches_the_next_call(tool):
    mark = f"{os.getpid()}_{tool.mode}"
    assert tool(_LEAVE.replace("MARK", mark)).text == "left\n"
    assert tool(_LOOK.replace("MARK", mark)).text == "[]\n"
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):  # nor the host
        assert not [p for p in os.listdir(folder) if mark in p] if os.path.isdir(folder) else True


def test_remove_tree_is_iterative_and_never_follows_links(tmp_path):
    top = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    fd = os.open(top, os.O_RDONLY)
    try:
        here = fd
        for _ in range(3000):  # deeper than PATH_MAX allows as one path
            os.mkdir("d" * 3, dir_fd=here)
            nxt = os.open("ddd", os.O_RDONLY, dir_fd=here)
            if here != fd:
                os.close(here)
            here = nxt
        os.symlink(str(outside), "link", dir_fd=here)
        os.mkdir("locked", dir_fd=here)
        os.chmod("locked", 0, dir_fd=here)
        os.close(here)
    finally:
        os.close(fd)
    assert remove_tree(top) and not os.path.exists(top)
    assert (outside / "keep").read_text() == "mine"


def test_uid_pool_times_out_when_every_uid_is_retired(monkeypatch):
    pool = UidPool()
    monkeypatch.setattr(uids, "has_processes", lambda uid: True)
    for _ in range(UidPool.PER_PROCESS):
        pool.release(pool.acquire(), clean=False)
    start = time.monotonic()
    with pytest.raises(UidPoolExhausted, match="outlived their runs"):
        pool.acquire(timeout_s=0.3)
    assert time.monotonic() - start < 2
    monkeypatch.setattr(uids, "has_processes", lambda uid: False)
    assert UidPool.is_private(pool.acquire(timeout_s=0.3))  # a retired uid comes back once clean


def test_a_call_with_no_free_uid_reads_back_an_error(monkeypatch, tmp_path, caplog):
    if unavailable("namespaces") or os.geteuid() != 0:
        pytest.skip("needs a root caller")
    tool = PythonTool(PythonToolConfig(sandbox="namespaces", tmp_root=str(tmp_path)))

    def exhausted(timeout_s=30.0):
        raise UidPoolExhausted("no run uid became free")

    monkeypatch.setattr(tool.isolation.uids, "acquire", exhausted)
    with caplog.at_level(logging.WARNING, logger="arpo_fast.rollout.tools.python"):
        result = tool("print(1)")
    assert result.status == "sandbox_error" and "no run uid" in result.text
    logged = [r for r in caplog.records if "no run uid" in r.getMessage()]
    assert logged and all(r.exc_info is None and "\n" not in r.getMessage() for r in logged)


# -- 5. every byte back to the model obeys the cap ----------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "raise ValueError('v' * 20000)",
        "print('o' * 3990)\nraise ValueError('v' * 20000)",
        "import sys\nfor i in range(50):\n    sys.stderr.write('e' * 500 + '\\n')\nsys.exit(1)",
        "print('t' * 5000, flush=True)\nwhile True:\n    pass",
        "import os, signal\nprint('k' * 5000, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)",
    ],
)
@pytest.mark.parametrize("cap", [4000, 60])
def test_error_output_obeys_the_cap(request, code, cap):
    mode = next((m for m in SANDBOXES if not unavailable(m)), "unsafe")
    t = make_tool(request, mode, max_output_chars=cap, timeout_s=2)
    result = t(code)
    assert result.status != "ok" and len(result.text) <= cap, (len(result.text), result.text[:300])
    if cap == 4000 and "ValueError" in code:
        assert "ValueError: vvv" in result.text  # the error line keeps its start


# -- 6. the kernel's riskier interfaces --------------------------------------------------------

_SYSCALLS = """
import ctypes, errno, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(256)
def call(nr, *args):
    if libc.syscall(nr, *args) == 0:
        os._exit(0) if nr == CLONE else None
        return "allowed"
    return errno.errorcode.get(ctypes.get_errno(), "?")
CLONE = NR["clone"]
out = {
    "io_uring_setup": call(NR["io_uring_setup"], 1, buf),
    "unshare": call(NR["unshare"], 0x10000000),
    "clone": call(CLONE, 0x10000000 | 17, 0, 0, 0, 0),
    "clone3": call(NR["clone3"], buf, 88),
    "mount": call(NR["mount"], b"none", b"/tmp", b"tmpfs", 0, 0),
    "keyctl": call(NR["keyctl"], 0, 0, 0, 0),
    "bpf": call(NR["bpf"], 0, buf, 0),
    "ptrace": call(NR["ptrace"], 0, 0, 0, 0),
    "perf_event_open": call(NR["perf_event_open"], buf, 0, -1, -1, 0),
    "setns": call(NR["setns"], 0, 0),
}
t = threading.Thread(target=lambda: out.setdefault("thread", "ran"))
t.start(); t.join()
out["subprocess"] = subprocess.run(["echo", "ran"], capture_output=True, text=True).stdout.strip()
status = open("/proc/self/status").read()
out["filter"] = "Seccomp:\\t2" in status and "NoNewPrivs:\\t1" in status
print(__import__("json").dumps(out))
"""


@pytest.mark.parametrize("mode", params((*SANDBOXES, "unsafe")))
def test_seccomp_denies_each_interface(request, mode):
    """In every mode, unsafe included: no_new_privs, the filter loaded, each interface denied."""
    from arpo_fast.rollout.tools import seccomp

    machine = os.uname().machine
    if machine not in seccomp.ARCHES:
        pytest.skip(f"no seccomp table for {machine}")
    names = (
        "io_uring_setup",
        "unshare",
        "clone",
        "clone3",
        "mount",
        "keyctl",
        "bpf",
        "ptrace",
        "perf_event_open",
        "setns",
    )
    numbers = {n: seccomp.syscall_number(n, machine) for n in names}
    out = _json(make_tool(request, mode)(f"NR = {numbers!r}\n" + _SYSCALLS))
    assert out.pop("filter") and out.pop("thread") == "ran" and out.pop("subprocess") == "ran"
    assert out.pop("clone3") == "ENOSYS"  # so that glibc falls back to clone, whose flags are seen
    assert out == {n: "EPERM" for n in names if n != "clone3"}


# -- the newcomer's machine, and an unprivileged caller ---------------------------------------

_CALLER = """
import json, os, sys
from arpo_fast.rollout.tools import choice, python_tool, sandbox
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
if sys.argv[1] == "no-bwrap":
    sandbox.shutil.which = lambda name: None
if sys.argv[2] == "no-userns":
    sandbox._userns_allowed = lambda: False
try:
    tool = PythonTool(PythonToolConfig())
except ValueError as exc:
    print(json.dumps({"refused": str(exc)}))
    sys.exit(0)
code = f"TRAINER = {os.getpid()}\\nCANARY = {sys.argv[3]!r}\\n" + sys.argv[4]
out = json.loads(tool(code).text)
out.update(mode=tool.mode, me=os.getuid(), secret=tool(f"print(open({sys.argv[5]!r}).read())").text)
print(json.dumps(out))
"""


@needs_root
@pytest.mark.parametrize("bwrap", ["bwrap", "no-bwrap"])
def test_an_unprivileged_caller_is_isolated_too(tmp_path, bwrap):
    """A normal user runs the tool (as the trainer would, defaults only): the code cannot signal the
    caller, read the caller's private files or write them."""
    if bwrap == "bwrap" and unavailable("bwrap"):
        pytest.skip("bwrap unusable here")
    out = _as_user(tmp_path, bwrap, "userns")
    if "refused" in out:
        assert "apt-get install bubblewrap" in out["refused"] and "sandbox='unsafe'" in out["refused"]
        return
    assert out["mode"] == ("bwrap" if bwrap == "bwrap" else "namespaces")
    assert out["signal"] != "DONE" and out["environ"] != "DONE" and out["write"] != "DONE"
    assert "TOP-SECRET" not in out["secret"] and out["no_new_privs"]


@needs_root
def test_an_unprivileged_caller_without_any_sandbox_is_refused_with_instructions(tmp_path):
    out = _as_user(tmp_path, "no-bwrap", "no-userns")
    assert "apt-get install bubblewrap" in out["refused"] and "sandbox='unsafe'" in out["refused"]


@needs_root
def test_the_readable_copy_is_the_same_interpreter_for_another_uid():
    """The copy made for the uid mode runs, as another uid, the same Python with the same
    extension modules (its libpython is the copied one, not the system's)."""
    python = interpreter.readable_copy(sys.executable)
    code = "import json, ssl, sys; print(json.dumps([sys.version]))"
    done = subprocess.run(
        [python, "-I", "-c", code],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-1000:]
    assert json.loads(done.stdout)[0] == sys.version


def _as_user(tmp_path, bwrap: str, userns: str, uid: int = 65534) -> dict:
    """Run ``_CALLER`` as ``uid`` with an interpreter that uid can run."""
    python = interpreter.readable_copy(sys.executable)
    home = tempfile.mkdtemp(prefix="arpo_caller_")
    os.chown(home, uid, uid)
    secret = os.path.join(home, "secret")
    with open(secret, "w") as f:
        f.write("TOP-SECRET")
    os.chown(secret, uid, uid)
    os.chmod(secret, 0o600)
    try:
        done = subprocess.run(
            [python, "-c", _CALLER, bwrap, userns, os.path.join(home, "canary"), _PRIVILEGES, secret],
            user=uid,
            group=uid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=home,
            env={"HOME": home, "PATH": os.environ["PATH"], "TMPDIR": home},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert not os.path.exists(os.path.join(home, "canary"))
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_modes_are_killed_with_their_session(tool):
    """A run that ignores SIGTERM and forks is gone once the call returns."""
    code = (
        "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "for _ in range(3):\n    os.fork()\ntime.sleep(60)"
    )
    t = PythonTool(PythonToolConfig(sandbox=tool.mode, timeout_s=1, tmp_root=tool.config.tmp_root))
    assert t(code).status == "timeout"
    time.sleep(0.3)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) in _pool_range(t)]


def _uid_of(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def _pool_range(tool) -> range:
    pool = tool.isolation.uids
    return range(pool._base, pool._base + UidPool.PER_PROCESS) if pool else range(0)


_DYING_TRAINER = """
import sys
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
tool = PythonTool(PythonToolConfig(sandbox=sys.argv[1], timeout_s=60, tmp_root=sys.argv[2]))
print("ready", flush=True)
tool("import time\\nf = open('arpo_marker_' + 'MARK', 'w')\\ntime.sleep(50)")
"""


def _holding(mark: str) -> list[int]:
    """Processes with a file named after ``mark`` open."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(mark in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds):
                found.append(int(pid))
        except OSError:
            continue
    return found


@needs_root
@pytest.mark.parametrize("mode", params((*SANDBOXES, "unsafe")))
def test_a_run_ends_with_its_trainer(mode, tmp_path):
    mark = f"{os.getpid()}_{mode}"
    root = tempfile.mkdtemp(prefix="arpo_dying_")
    os.chmod(root, 0o755)
    trainer = subprocess.Popen(
        [sys.executable, "-c", _DYING_TRAINER.replace("MARK", mark), mode, root],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert trainer.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 10
        while not _holding(mark) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _holding(mark), "the run never started"
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 3
        while _holding(mark) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _holding(mark)
        for pid in left:
            os.kill(pid, 9)
        assert not left, "the run outlived the trainer"
    finally:
        trainer.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_cgroup_v2_runs_sit_beside_the_trainer(monkeypatch, tmp_path):
    """On a cgroup v2 machine (faked here: plain files stand in for the kernel's), the runs' folder
    goes beside the trainer's own cgroup, with memory and pids delegated, and each run is limited."""
    from arpo_fast.rollout.tools import cgroups

    mount = tmp_path / "cgroup"
    trainer = mount / "user.slice" / "session.scope"
    trainer.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpu memory pids\n")
    (mount / "user.slice" / "cgroup.subtree_control").write_text("cpu\n")
    monkeypatch.setattr(cgroups, "_mounts", lambda: [("/", str(mount), "cgroup2", "rw")])
    monkeypatch.setattr(cgroups, "_own_paths", lambda: {"": "/user.slice/session.scope"})
    parent, why = cgroups.detect()
    assert parent is not None and parent.version == 2, why
    folder = mount / "user.slice" / f"arpo_fast-{os.getpid()}"
    assert parent.folders == {"": str(folder)}
    assert (folder / "cgroup.subtree_control").read_text() == "+memory +pids"
    run = parent.create(128 << 20, 10)
    run_dir = Path(run.dirs[""])
    assert (run_dir / "memory.max").read_text() == str(128 << 20)
    assert (run_dir / "pids.max").read_text() == "10"
    assert (run_dir / "memory.swap.max").read_text() == "0"
    assert run.wrap(["x"])[-3:] == [str(run_dir / "cgroup.procs"), "--", "x"]
    atexit.unregister(parent.close)  # plain folders of files: nothing for it to remove
