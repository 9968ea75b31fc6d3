"""The python tool: each hostile program gets a clear result, in every sandbox mode available here
(bubblewrap, the launcher's own namespaces, a throw-away uid); what each mode keeps out is tested in
``test_python_sandbox.py``."""

import logging
import os
import re
import socket
import textwrap
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from python_tool_modes import make_tool, params

from arpo_fast.rollout.tools import choice, python_tool, sandbox
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig, clean_code, dedent, unfence
from arpo_fast.rollout.tools.sandbox import SandboxUnavailable
from arpo_fast.rollout.tools.uids import UidPool


@pytest.fixture(scope="module", params=params())
def tool(request):
    return make_tool(request, request.param, timeout_s=3)


def _uids_left(tool) -> int:
    """Processes still running under any of the tool's throw-away uids."""
    if tool.isolation.uids is None:
        return 0
    low = tool.isolation.uids._base
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += low <= os.stat(f"/proc/{pid}").st_uid < low + UidPool.PER_PROCESS
        except OSError:
            pass
    return count


def test_prints_output(tool):
    result = tool("print(6 * 7)")
    assert result.ok and result.text == "42\n"
    assert os.listdir(tool.config.tmp_root) == []  # no run directory is left on the host


def test_error_returns_the_last_lines(tool):
    result = tool("def f():\n    return 1 / 0\nf()")
    assert result.status == "error"
    assert result.text.splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert 'File "main.py", line 2' in result.text and "return 1 / 0" in result.text


def test_limit_hints_see_past_interleaved_tracebacks(tool):
    """Forked processes failing together interleave their tracebacks, so the error line may sit
    above the last lines kept; the limit hint still comes."""
    code = (
        "import sys\nsys.stderr.write('BlockingIOError: [Errno 11] Resource temporarily unavailable\\n'"
        " + 'Traceback (most recent call last):\\n' * 10)\nsys.exit(1)"
    )
    result = tool(code)
    assert result.status == "error"
    assert (
        result.text.splitlines()[-1] == f"(The limit is {tool.config.max_processes} processes and threads.)"
    )


def test_syntax_error_and_empty_code(tool):
    assert "SyntaxError" in tool("def f(:\n  pass").text
    assert tool("   ").status == "bad_input"
    assert tool("print('no newline at end')").ok


def test_exit_and_quit_work(tool):
    assert tool("print('a')\nexit()").text == "a\n"
    assert tool("import sys\nsys.exit(3)").info["returncode"] == 3


def test_infinite_loop_times_out(tool):
    start = time.monotonic()
    result = tool("print('started', flush=True)\nwhile True:\n    pass")
    assert result.status == "timeout" and time.monotonic() - start < 6
    assert result.text.startswith("started") and "Timed out after 3 s" in result.text


def test_fork_bomb_is_contained(tool):
    result = tool("import os\nwhile True:\n    os.fork()")
    assert result.status in ("error", "timeout")
    assert "process" in result.text or "Timed out" in result.text
    time.sleep(0.2)
    assert _uids_left(tool) == 0
    assert tool("print('still fine')").text == "still fine\n"


def test_huge_allocation_fails_cleanly(tool):
    result = tool("x = bytearray(10 * 2**30)\nprint('allocated')")
    assert result.status == "error" and "MemoryError" in result.text
    assert "2048 MB for the run" in result.text


def test_flood_of_output_is_cut(tool):
    start = time.monotonic()
    result = tool("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)")
    assert result.ok and result.truncated and time.monotonic() - start < 6
    assert result.text.startswith("x" * 3800) and "output cut" in result.text
    assert "was stopped" in result.text
    assert len(result.text) <= 4000


def test_cannot_read_files_outside(tool, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    secret.chmod(0o600)
    result = tool(f"print(open({str(secret)!r}).read())")
    assert result.status == "error" and "TOP-SECRET" not in result.text
    assert ("PermissionError" if tool.mode == "uid" else "FileNotFoundError") in result.text


def test_network_is_off(tool):
    if not tool.isolation.net_private:
        pytest.skip("no network namespace could be made here")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))  # loopback only
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "print('connected')"
        )
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
    result = tool(
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('parent done')"
    )
    assert result.ok and result.text == "parent done\n"
    time.sleep(0.2)
    assert _uids_left(tool) == 0


def test_sandbox_hides_the_host(tool):
    if tool.mode == "uid":
        pytest.skip("the uid mode shares the host's file system (docs/tools.md)")
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


# -- markdown fences: a linear scan, the same answers as the regex it replaced ------------------

_OLD_FENCE = re.compile(r"^\s*```[A-Za-z0-9_+-]*[ \t]*\n(.*?)\n?\s*```\s*$", re.DOTALL)


def _old_unfence(body: str) -> str:
    fenced = _OLD_FENCE.match(body)
    return fenced.group(1) if fenced else body


def test_clean_code_strips_fences_and_indent():
    assert clean_code("\n```python\nprint(1)\n```\n") == "print(1)"
    assert clean_code("\n    x = 1\n    print(x)\n") == "x = 1\nprint(x)"
    assert clean_code("```py \n```") == "" and clean_code("```\nno end") == "```\nno end"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="`\n \t\rpy3x+é\u2003", max_size=30))
def test_unfence_matches_the_regex_it_replaced(body):
    assert unfence(body) == _old_unfence(body)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="  \t\n\rxy", max_size=40))
def test_dedent_matches_textwrap(text):
    assert dedent(text) == textwrap.dedent(text)


@pytest.mark.parametrize(
    "body",
    [
        "```\n" + " " * 48_000 + "x",
        "```\n" + "\n" * 48_000 + "x",
        "```\n" + " \n" * 24_000 + "``",
        " " * 48_000 + "```",
        "```python\n" + "a" * 48_000,
    ],
)
def test_fence_scan_is_linear(body):
    """48k characters of model text cost the trainer thread milliseconds (the regex took seconds)."""
    start = time.perf_counter()
    clean_code(body)
    assert time.perf_counter() - start < 0.05


# -- settings, choice of the sandbox ----------------------------------------------------------


def test_a_huge_call_is_refused_before_it_is_read(tmp_path):
    """Megabytes of short lines are refused by their length alone: no parsing, no copy of them."""
    import tracemalloc

    tool = PythonTool(PythonToolConfig(tmp_root=str(tmp_path), max_code_chars=1000))
    assert tool("print(1)\n" * 100).ok  # 900 characters: under the cap
    huge = "x=1\n" * 1_000_000
    tracemalloc.start()
    try:
        result = tool(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.status == "bad_input" and "4,000,000 characters" in result.text
    assert "limit of 1,000" in result.text and peak < 1 << 20
    assert PythonToolConfig().max_code_chars == 100_000  # the documented default


def test_config_errors():
    with pytest.raises(ValueError, match="sandbox must be one of"):
        PythonToolConfig(sandbox="docker")
    with pytest.raises(ValueError, match="sandbox='none' is gone.*'unsafe'"):
        PythonToolConfig(sandbox="none")
    for key in ("timeout_s", "memory_mb", "max_disk_mb", "max_open_files", "process_memory_mb"):
        with pytest.raises(ValueError, match=key):
            PythonToolConfig(**{key: 0})
    with pytest.raises(ValueError, match="python: '/no/such/python' is not an executable"):
        PythonToolConfig(python="/no/such/python")
    with pytest.raises(ValueError, match="extra_ro_paths: /no/such/data does not exist"):
        PythonToolConfig(extra_ro_paths=("/no/such/data",))
    with pytest.raises(ValueError, match="tmp_root"):
        PythonToolConfig(tmp_root="/no/such/folder")


def test_the_choice_is_logged_once(caplog, monkeypatch, tmp_path):
    """Logged once, by the tool that runs code: a settings check before it probes quietly."""
    monkeypatch.setattr(choice, "_CHOSEN", {})
    monkeypatch.setattr(choice, "_ANNOUNCED", set())
    with caplog.at_level(logging.INFO, logger="arpo_fast.rollout.tools.python"):
        python_tool.check_config(PythonToolConfig(tmp_root=str(tmp_path)))
    assert not [r for r in caplog.records if "python tool: sandbox" in r.message]
    with caplog.at_level(logging.INFO, logger="arpo_fast.rollout.tools.python"):
        for _ in range(2):
            assert PythonTool(PythonToolConfig(tmp_root=str(tmp_path)))("print(1)").ok
    assert len([r for r in caplog.records if "python tool: sandbox" in r.message]) == 1


def test_missing_bwrap_is_no_reason_to_run_unisolated(monkeypatch, tmp_path):
    monkeypatch.setattr(choice, "_CHOSEN", {})
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    tool = PythonTool(PythonToolConfig(sandbox="auto", tmp_root=str(tmp_path)))
    assert tool.mode in ("namespaces", "uid") and tool("print(2)").text == "2\n"
    with pytest.raises(SandboxUnavailable, match="not installed.*apt-get install bubblewrap"):
        PythonTool(PythonToolConfig(sandbox="bwrap", tmp_root=str(tmp_path)))


def test_refusal_says_how_to_install_and_how_to_opt_out(monkeypatch):
    """Where nothing can isolate the code, the tool refuses at construction, in one line."""
    monkeypatch.setattr(choice, "_CHOSEN", {})
    monkeypatch.setattr(sandbox, "candidates", lambda asked: ["bwrap", "namespaces"])
    monkeypatch.setattr(sandbox, "why_not", lambda mode, python: f"{mode} is not allowed here")
    with pytest.raises(SandboxUnavailable) as info:
        PythonTool(PythonToolConfig())
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert "apt-get install bubblewrap" in message and "sandbox='unsafe'" in message


def test_a_call_never_raises(monkeypatch, tmp_path):
    tool = PythonTool(PythonToolConfig(tmp_root=str(tmp_path)))

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(python_tool, "code_fd", broken)
    result = tool("print(1)")
    assert result.status == "sandbox_error" and "disk on fire" in result.text
