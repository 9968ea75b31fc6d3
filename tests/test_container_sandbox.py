"""The python tool in a container without CAP_SYS_ADMIN (a default ``docker run``), where ``auto``
falls back to the throw-away-uid mode: the run reaches no socket and no message queue, leaves
nothing in any world-writable folder, its uids are checked to be nobody else's, and the choice is
named in the log and in the run's summary."""

import json
import os
import stat
import subprocess
import sys
import tempfile

import pytest

from arpo_fast.rollout.tools import choice, hostdirs, uids
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
from arpo_fast.rollout.tools.sandbox import SandboxUnavailable
from arpo_fast.rollout.tools.uids import UidPool

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the uid mode is root's")
CAP_SYS_ADMIN, PR_CAPBSET_DROP = 21, 24

# started as root: drops CAP_SYS_ADMIN from the bounding set and executes itself again, which
# leaves it without that capability, as in a default container; then runs the tool with auto
_CONTAINER = """
import ctypes, json, os, socket, sys, tempfile
if "--dropped" not in sys.argv:
    assert ctypes.CDLL(None).prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) == 0
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[-2], "--dropped", sys.argv[-1]])
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
mark = sys.argv[-1]
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1)
root = tempfile.mkdtemp()
os.chmod(root, 0o755)
tool = PythonTool(PythonToolConfig(tmp_root=root, timeout_s=10))
code = CODE.replace("PORT", str(server.getsockname()[1])).replace("MARK", mark)
out = json.loads(tool(code).text)
folders = [f for f in ("/run/lock", "/dev/shm", "/var/tmp") if os.path.isdir(f)]
left = [p for f in folders for p in os.listdir(f) if mark in p]
print(json.dumps({"mode": tool.mode, "run": out, "left": left}))
"""
_CODE = """
import ctypes, errno, json, os, socket
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "DONE"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", PORT), timeout=2))
attempt("unix", lambda: socket.socket(socket.AF_UNIX))
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
def pair():
    a, b = socket.socketpair()
    a.send(b"x")
    assert b.recv(1) == b"x"
attempt("pair", pair)
libc = ctypes.CDLL(None, use_errno=True)
mq = libc.mq_open(b"/arpo_MARK", os.O_CREAT | os.O_RDWR, 0o600, None)
out["mq"] = "DONE" if mq >= 0 else errno.errorcode[ctypes.get_errno()]
for folder in ("/run/lock", "/dev/shm", "/var/tmp"):
    attempt(folder, lambda: open(os.path.join(folder, "arpo_left_MARK"), "w").write("x"))
print(json.dumps(out))
"""


@needs_root
def test_auto_without_cap_sys_admin_holds_in_the_uid_mode(tmp_path):
    mark = f"c{os.getpid()}"
    script = _CONTAINER.replace("PR_CAPBSET_DROP", str(PR_CAPBSET_DROP)).replace(
        "CAP_SYS_ADMIN", str(CAP_SYS_ADMIN)
    )
    script = script.replace("CODE", repr(_CODE))
    done = subprocess.run(
        [sys.executable, "-c", script, script, mark], capture_output=True, text=True, timeout=240, cwd="/"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["mode"] == "uid", done.stderr[-2000:]
    run = out.pop("run")
    assert run.pop("pair") == "DONE"  # AF_UNIX socket pairs (multiprocessing, asyncio) still work
    assert run == {
        "tcp": "EPERM",
        "unix": "EPERM",
        "udp": "EPERM",
        "mq": "EPERM",
        "/run/lock": "DONE",
        "/dev/shm": "DONE",
        "/var/tmp": "DONE",
    }
    assert out["left"] == []  # what it wrote is gone, /run/lock included
    log = done.stderr
    assert (
        "python tool: sandbox auto picked uid (bwrap: " in log and "sockets and message queues refused" in log
    )
    assert "/run/lock" in log  # the folders swept are named


def test_world_writable_folders_are_found_where_others_can_reach_them(tmp_path):
    top = tmp_path / "host"
    for path, mode in [
        ("srv", 0o755),
        ("srv/cache", 0o777),  # found
        ("srv/a/b", 0o755),
        ("srv/a/b/drop", 0o777),  # found, three levels down
        ("private", 0o700),
        ("private/open", 0o777),  # not reachable by others: not listed
        ("shared", 0o1777),  # found; a sticky shared folder is swept one level in, not walked
        ("shared/x/y", 0o777),
    ]:
        (top / path).mkdir(parents=True, exist_ok=True)
        os.chmod(top / path, mode)
    for folder in ("srv/a",):
        os.chmod(top / folder, 0o755)
    os.chmod(top, 0o755)
    found, note = hostdirs.find(str(top))
    assert sorted(found) == sorted(str(top / p) for p in ("srv/cache", "srv/a/b/drop", "shared")) and not note
    found, note = hostdirs.find(str(top), max_folders=2)
    assert "stopped after 2 folders" in note


def test_the_walk_skips_pseudo_read_only_network_and_fuse_mounts(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    lines = [
        "22 1 0:21 / /proc rw,nosuid - proc proc rw",
        "30 1 0:30 / /data rw,relatime - fuse.gcsfuse bucket rw",
        "31 1 0:31 / /mnt/nfs rw - nfs4 server:/x rw",
        "32 1 8:1 / /opt/ro ro,relatime - ext4 /dev/sda1 ro",
        "33 1 8:2 / /scratch\\040space rw - ext4 /dev/sda2 rw",
    ]
    mountinfo.write_text("\n".join(lines) + "\n")
    assert hostdirs._skipped_mounts(str(mountinfo)) == {"/proc", "/data", "/mnt/nfs", "/opt/ro"}


def test_what_a_uid_owns_in_those_folders_is_swept(tmp_path):
    shared = tmp_path / "shared"
    (shared / "inner").mkdir(parents=True)
    os.chmod(shared / "inner", 0o777)
    mine, inner, other = shared / "mine", shared / "inner" / "mine", shared / "other"
    for path in (mine, inner, other):
        path.write_text("x")
    uid = UidPool.BASE + 12345
    if os.geteuid() == 0:
        os.chown(mine, uid, uid)
        os.chown(inner, uid, uid)
    found = hostdirs.owned_entries((str(shared),), range(uid, uid + 1))
    if os.geteuid() != 0:
        assert found == []
        return
    assert sorted(found) == sorted([str(mine), str(inner)])
    uids.sweep_files(uid, (str(shared),))
    assert not mine.exists() and not inner.exists() and other.read_text() == "x"


def test_pool_uids_held_by_an_account_are_refused(tmp_path, monkeypatch):
    pool = UidPool()
    passwd = tmp_path / "passwd"
    passwd.write_text(f"root:x:0:0::/root:/bin/sh\nbob:x:{pool._base + 7}:100::/home/bob:/bin/sh\n")
    monkeypatch.setattr(uids, "ACCOUNT_FILES", (str(passwd),))
    message = pool.collision(())
    assert "are not free here" in message and "'bob' with id" in message and "\n" not in message
    monkeypatch.setattr(uids, "ACCOUNT_FILES", ())
    assert UidPool().collision(()) == ""


@needs_root
def test_pool_uids_held_by_a_process_or_a_file_are_refused(tmp_path):
    pool = UidPool()
    sleeper = subprocess.Popen(["sleep", "30"], user=pool._base + 9, group=pool._base + 9, extra_groups=[])
    try:
        assert f"process {sleeper.pid} runs as {pool._base + 9}" in pool.collision(())
    finally:
        sleeper.kill()
        sleeper.wait()
    folder = tempfile.mkdtemp()
    try:
        path = os.path.join(folder, "theirs")
        open(path, "w").close()
        os.chown(path, pool._base + 3, 0)
        assert f"{path} is owned by one of them" in UidPool().collision((folder,))
    finally:
        os.unlink(path)
        os.rmdir(folder)


@needs_root
def test_a_collision_refuses_the_uid_mode_in_one_line(tmp_path, monkeypatch):
    passwd = tmp_path / "passwd"
    monkeypatch.setattr(uids, "_SHARED", None)
    monkeypatch.setattr(choice, "_CHOSEN", {})
    base = UidPool.shared()._base
    passwd.write_text(f"alice:x:{base + 100}:{base + 100}::/home/alice:/bin/sh\n")
    monkeypatch.setattr(uids, "ACCOUNT_FILES", (str(passwd),))
    root = tempfile.mkdtemp()
    os.chmod(root, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        with pytest.raises(SandboxUnavailable) as info:
            PythonTool(PythonToolConfig(sandbox="uid", tmp_root=root))
    finally:
        os.rmdir(root)
    message = str(info.value)
    assert "\n" not in message and "uid: the run uids" in message and "'alice'" in message


def test_the_summary_names_each_tools_sandbox(request, monkeypatch):
    from python_tool_modes import make_tool

    from arpo_fast.train.config import TrainConfig
    from arpo_fast.train.loop import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tool = make_tool(request, "auto")  # a host folder any run uid can enter, removed afterwards
    out = os.path.join(tool.config.tmp_root, "run")
    flat = dict(out=out, steps=1, prompts_per_step=1, rollouts=2, initial=1, max_response_tokens=8)
    flat.update(demo_warm_start=0, eval_data="none", tools="python")
    flat["tool_settings"] = json.dumps({"python": {"tmp_root": tool.config.tmp_root}})
    train(TrainConfig.from_flat(**flat))
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["sandbox"] == {"python": tool.mode}
