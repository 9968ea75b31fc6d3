"""A trainer that is PID 1 or a child subreaper (a container's entrypoint) gets the orphans of its
runs: it must reap them (else the uid pool runs dry and zombies fill the pid space), and it must
never reap a child someone else in the process waits for."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
from python_tool_modes import SANDBOXES, params

from arpo_fast.rollout.tools.reap import Orphans, is_reaper

_TRAINER = """
import ctypes, json, os, subprocess, sys, tempfile
assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
from arpo_fast.rollout.tools.reap import is_reaper

root = tempfile.mkdtemp()
os.chmod(root, 0o755)
# a child of the trainer's own, which ends during the calls: its status is its owner's to collect
own = subprocess.Popen(["/bin/sh", "-c", "exit 7"])
tool = PythonTool(PythonToolConfig(sandbox=sys.argv[1], tmp_root=root, timeout_s=2))
escape = (
    "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(30)\\n    os._exit(0)\\n"
    "print('ok')"
)
forks = "import os, time\\nfor _ in range(3):\\n    os.fork()\\ntime.sleep(30)"
texts = [tool(escape).text for _ in range(3)] + [tool(forks).status]

def children():
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.append([int(p), fields[0]])
    return found

pool = tool.isolation.uids
left = [c for c in children() if c[0] != own.pid]
print(json.dumps({"texts": texts, "left": left, "own": own.wait(), "reaper": is_reaper(),
                  "retired": len(pool._retired) if pool else 0}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the modes with leftovers to reap are root's")
@pytest.mark.parametrize("mode", params((*SANDBOXES, "unsafe")))
def test_a_subreaper_trainer_reaps_what_its_runs_leave(mode):
    done = subprocess.run(
        [sys.executable, "-c", _TRAINER, mode],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tempfile.gettempdir(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["reaper"] and out["texts"] == ["ok\n"] * 3 + ["timeout"]
    assert out["left"] == [] and out["retired"] == 0, out  # no zombie, no retired uid
    assert out["own"] == 7  # the trainer's own child was left to its owner


def test_orphans_are_inactive_where_nothing_comes_back():
    assert not is_reaper()  # pytest is neither PID 1 nor a subreaper
    orphans = Orphans()
    orphans.watch([os.getpid(), os.getppid()])
    assert not orphans.active and orphans.reap(wait_s=5) == 0


def test_only_watched_exited_children_are_reaped():
    """A watched child is reaped once it exits; an unwatched one is left to its owner."""
    watched = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    other = subprocess.Popen(["/bin/sh", "-c", "exit 5"])
    orphans = Orphans(active=True)
    orphans.watch([watched.pid])
    assert orphans.reap(wait_s=10) == 1
    orphans.close()
    assert other.wait(timeout=10) == 5
    watched.returncode = 0  # reaped above: Popen must not wait for it again
