"""The python tool: each hostile program is contained and gets a clear result, in every sandbox mode
available here (bubblewrap, and resource limits without namespaces)."""

import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time

import pytest

from arpo_fast.rollout.tools import python_tool, sandbox
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig, clean_code


def _world_readable(path: str) -> bool:
    """Whether an unprivileged user can run ``path`` (every directory above it searchable)."""
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(2, len(parts)):
        if not os.stat("/".join(parts[:i])).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(real).st_mode & stat.S_IROTH)


def _limits_python() -> str:
    """An interpreter the limits mode can drop privileges for (its files readable by others)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _world_readable(candidate):
            return candidate
    return sys.executable


def _bwrap_works() -> bool:
    if shutil.which("bwrap") is None:
        return False
    try:
        return PythonTool(PythonToolConfig(sandbox="bwrap")).mode == "bwrap"
    except RuntimeError:
        return False


MODES = [pytest.param("bwrap", marks=pytest.mark.skipif(not _bwrap_works(), reason="bwrap unusable")),
         "limits"]


@pytest.fixture(scope="module", params=MODES)
def tool(request):
    # not under pytest's 0700 tmp_path: an unprivileged run uid must be able to enter its directory
    root = tempfile.mkdtemp(prefix=f"arpo_test_runs_{request.param}_")
    os.chmod(root, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    if request.param == "bwrap":
        config = PythonToolConfig(sandbox="bwrap", timeout_s=3, tmp_root=root)
    else:
        config = PythonToolConfig(sandbox="none", timeout_s=3, tmp_root=root, python=_limits_python())
    t = PythonTool(config)
    assert t.mode == request.param
    return t


def _uids_left(tool) -> int:
    """Processes still running under any of the tool's throw-away uids."""
    if tool._uids is None:
        return 0
    low, high = tool._uids._base, tool._uids._base + sandbox.UidPool.PER_PROCESS
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += low <= os.stat(f"/proc/{pid}").st_uid < high
        except OSError:
            pass
    return count


def _needs_uid_drop(tool):
    if tool.mode == "limits" and tool._uids is None and sandbox.is_root():
        pytest.skip("limits mode as root without a readable interpreter cannot drop privileges")


def test_prints_output(tool):
    result = tool("print(6 * 7)")
    assert result.ok and result.text == "42\n"
    assert os.listdir(tool.config.tmp_root) == []  # the run's directory is gone


def test_error_returns_the_last_lines(tool):
    result = tool("def f():\n    return 1 / 0\nf()")
    assert result.status == "error"
    assert result.text.splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert 'File "main.py", line 2' in result.text


def test_limit_hints_see_past_interleaved_tracebacks(tool):
    """Forked processes failing together interleave their tracebacks, so the error line may sit
    above the last lines kept; the limit hint still comes."""
    code = ("import sys\nsys.stderr.write('BlockingIOError: [Errno 11] Resource temporarily unavailable\\n'"
            " + 'Traceback (most recent call last):\\n' * 10)\nsys.exit(1)")
    result = tool(code)
    assert result.status == "error"
    assert result.text.splitlines()[-1] == f"(The limit is {tool.config.max_processes} processes and threads.)"


def test_syntax_error_and_empty_code(tool):
    assert "SyntaxError" in tool("def f(:\n  pass").text
    assert tool("   ").status == "bad_input"
    assert tool("print('no newline at end')").ok


def test_infinite_loop_times_out(tool):
    start = time.monotonic()
    result = tool("print('started', flush=True)\nwhile True:\n    pass")
    assert result.status == "timeout" and time.monotonic() - start < 6
    assert result.text.startswith("started") and "Timed out after 3 s" in result.text


def test_fork_bomb_is_contained(tool):
    _needs_uid_drop(tool)
    result = tool("import os\nwhile True:\n    os.fork()")
    assert result.status in ("error", "timeout")
    assert "process" in result.text or "Timed out" in result.text
    time.sleep(0.2)
    assert _uids_left(tool) == 0
    assert tool("print('still fine')").text == "still fine\n"


def test_huge_allocation_fails_cleanly(tool):
    result = tool("x = bytearray(10 * 2**30)\nprint('allocated')")
    assert result.status == "error" and "MemoryError" in result.text
    assert "memory limit is 2048 MB" in result.text


def test_flood_of_output_is_cut(tool):
    start = time.monotonic()
    result = tool("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)")
    assert result.ok and result.truncated and time.monotonic() - start < 6
    assert result.text.startswith("x" * 4000) and "output cut" in result.text
    assert len(result.text) < 4300


def test_cannot_read_files_outside(tool, tmp_path):
    _needs_uid_drop(tool)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    secret.chmod(0o600)
    result = tool(f"print(open({str(secret)!r}).read())")
    assert result.status == "error" and "TOP-SECRET" not in result.text
    assert ("FileNotFoundError" if tool.mode == "bwrap" else "PermissionError") in result.text


def test_network_is_off(tool):
    if not tool._net_private:
        pytest.skip("no network namespace could be made here")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))  # loopback only
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "print('connected')")
        result = tool(code)
        assert result.status == "error" and "connected" not in result.text
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the host's loopback
    finally:
        server.close()


def test_killing_its_parent_harms_nobody(tool):
    result = tool("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('after')")
    # the caller (this test) is alive; the run ends with a readable result either way
    assert result.status in ("ok", "error")
    assert tool("print(1)").text == "1\n"


def test_leftover_background_process_is_killed(tool):
    _needs_uid_drop(tool)
    result = tool("import subprocess, sys\n"
                  "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                  "print('parent done')")
    assert result.ok and result.text == "parent done\n"
    time.sleep(0.2)
    assert _uids_left(tool) == 0


def test_bwrap_hides_the_host(tool):
    if tool.mode != "bwrap":
        pytest.skip("only bubblewrap hides the file system")
    here = os.path.dirname(os.path.abspath(__file__))
    result = tool(f"import os\nprint(os.path.exists({here!r}))\nopen('/usr/x', 'w')")
    assert result.text.startswith("False") and "Read-only file system" in result.text


def test_concurrent_calls(tool):
    results = [None] * 4

    def run(i):
        results[i] = tool(f"print({i} * 10)")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.text for r in results] == [f"{i * 10}\n" for i in range(4)]


def test_clean_code_strips_fences_and_indent():
    assert clean_code("\n```python\nprint(1)\n```\n") == "print(1)"
    assert clean_code("\n    x = 1\n    print(x)\n") == "x = 1\nprint(x)"


def test_config_errors():
    with pytest.raises(ValueError, match="sandbox"):
        PythonToolConfig(sandbox="docker")
    with pytest.raises(ValueError, match="timeout_s"):
        PythonToolConfig(timeout_s=0)


def test_fallback_is_logged_once(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(python_tool, "_PROBED", {})
    with caplog.at_level(logging.INFO, logger="arpo_fast.rollout.tools.python"):
        for _ in range(2):
            t = PythonTool(PythonToolConfig(sandbox="none", tmp_root=str(tmp_path)))
            assert t("print(1)").ok
    notes = [r for r in caplog.records if "resource limits and a temporary directory" in r.message]
    assert len(notes) == 1


def test_missing_bwrap_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(python_tool, "_PROBED", {})
    monkeypatch.setattr(python_tool.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="arpo_fast.rollout.tools.python"):
        t = PythonTool(PythonToolConfig(sandbox="auto", tmp_root=str(tmp_path)))
        assert t.mode == "limits" and t("print(2)").text == "2\n"
    assert any("not installed" in r.message for r in caplog.records)
    monkeypatch.setattr(python_tool, "_PROBED", {})
    with pytest.raises(RuntimeError, match="bwrap"):
        _ = PythonTool(PythonToolConfig(sandbox="bwrap", tmp_root=str(tmp_path))).mode


def test_sweep_never_signals_a_shared_uid(monkeypatch):
    """A uid outside the private pool range (e.g. "nobody") may belong to other programs: no sweep."""
    def refuse(*args, **kwargs):
        raise AssertionError("sweep tried to signal processes of a shared uid")

    monkeypatch.setattr(sandbox, "has_processes", lambda uid: True)
    monkeypatch.setattr(sandbox.subprocess, "run", refuse)
    assert sandbox.sweep_uid(65534) is True
    assert not sandbox.UidPool.is_private(65534)
    assert sandbox.UidPool.is_private(sandbox.UidPool.BASE)


@pytest.mark.skipif(not _bwrap_works(), reason="bwrap unusable")
def test_bwrap_runs_an_interpreter_that_lives_under_tmp():
    """A virtualenv under /tmp (a CI checkout, say) must stay visible beside the private /tmp."""
    import venv

    root = tempfile.mkdtemp(prefix="arpo_venv_under_tmp_")
    try:
        os.chmod(root, 0o755)
        venv.create(os.path.join(root, "venv"), symlinks=True, with_pip=False)
        python = os.path.join(root, "venv", "bin", "python")
        result = PythonTool(PythonToolConfig(sandbox="bwrap", timeout_s=10, python=python))("print(6 * 7)")
        assert result.text.strip() == "42", result
    finally:
        shutil.rmtree(root, ignore_errors=True)
