"""The tool executor: concurrency, futures, per-step de-duplication, and failures kept per call."""

import threading
import time

import pytest

from arpo_fast.rollout.tools.base import ToolResult
from arpo_fast.rollout.tools.executor import ExecutorConfig, ToolExecutor


class SlowEcho:
    """Answers with its input after ``delay`` seconds; counts calls."""

    name = "echo"

    def __init__(self, delay=0.0):
        self.delay, self.calls = delay, 0
        self._lock = threading.Lock()

    def __call__(self, query):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return ToolResult(f"echo: {query}")


def test_calls_run_concurrently_and_return_futures():
    echo = SlowEcho(delay=0.3)
    with ToolExecutor({"echo": echo}, ExecutorConfig(max_workers=4)) as ex:
        start = time.monotonic()
        futures = [ex.submit("echo", str(i)) for i in range(4)]
        assert time.monotonic() - start < 0.1  # submitting does not wait for the tool
        assert [f.result().text for f in futures] == [f"echo: {i}" for i in range(4)]
        assert time.monotonic() - start < 0.9  # four 0.3 s calls overlapped


def test_identical_calls_in_a_step_run_once():
    echo = SlowEcho(delay=0.05)
    with ToolExecutor({"echo": echo}) as ex:
        first = [ex.submit("echo", "same") for _ in range(5)]
        other = ex.submit("echo", "different")
        assert {f.result().text for f in first} == {"echo: same"} and other.result().ok
        assert echo.calls == 2 and ex.stats.executed == 2 and ex.stats.cache_hits == 4
        ex.new_step()
        ex.run("echo", "same")
        assert echo.calls == 3 and ex.stats.submitted == 7


def test_dedup_can_be_turned_off():
    echo = SlowEcho()
    with ToolExecutor({"echo": echo}, ExecutorConfig(dedup=False)) as ex:
        ex.run("echo", "x")
        ex.run("echo", "x")
    assert echo.calls == 2


def test_a_raising_tool_fails_only_its_call():
    class Broken:
        name = "broken"

        def __call__(self, query):
            raise RuntimeError("disk on fire")

    with ToolExecutor({"broken": Broken(), "echo": SlowEcho()}) as ex:
        bad, good = ex.submit("broken", "q"), ex.submit("echo", "q")
        assert bad.result().status == "error"
        assert "RuntimeError: disk on fire" in bad.result().text
        assert good.result().text == "echo: q" and ex.stats.errors == 1


def test_a_hanging_tool_times_out_alone():
    release = threading.Event()

    class Hang:
        name = "hang"

        def __call__(self, query):
            release.wait(10)
            return ToolResult("late")

    with ToolExecutor({"hang": Hang(), "echo": SlowEcho()}, ExecutorConfig(timeout_s=0.3)) as ex:
        hung, fine = ex.submit("hang", "q"), ex.submit("echo", "q")
        assert fine.result(timeout=1).text == "echo: q"
        result = hung.result(timeout=2)
        assert result.status == "timeout" and "did not answer within 0.3 s" in result.text
        assert ex.stats.timeouts == 1
        release.set()


def test_unknown_tool_and_wrong_return_type():
    class Wrong:
        name = "wrong"

        def __call__(self, query):
            return "a plain string"

    with ToolExecutor({"wrong": Wrong()}) as ex:
        unknown = ex.run("calculator", "1+1")
        assert unknown.status == "unknown_tool" and "available: wrong" in unknown.text
        assert "returned str, not ToolResult" in ex.run("wrong", "x").text


def test_config_errors():
    with pytest.raises(ValueError, match="max_workers"):
        ExecutorConfig(max_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        ExecutorConfig(timeout_s=0)


def test_python_tool_through_the_executor(tmp_path):
    from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig

    tool = PythonTool(PythonToolConfig(timeout_s=5))
    with ToolExecutor({"python": tool}, ExecutorConfig(max_workers=2)) as ex:
        futures = [ex.submit("python", f"print({i} ** 2)") for i in range(3)]
        assert [f.result().text for f in futures] == ["0\n", "1\n", "4\n"]
