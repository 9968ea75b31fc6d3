"""Tool names and settings are checked before anything slow: each mistake is one line naming the
flag (and, for a misspelt name, the close match), the model is never loaded, nothing is written."""

import os
import subprocess
import sys
from typing import Optional

import pytest

from arpo_fast.rollout.tools import check_tool_settings, choice, create_tool, register_tool, sandbox
from arpo_fast.rollout.tools.python_tool import PythonToolConfig
from arpo_fast.rollout.tools.validate import build_settings, close_match, json_depth, load_json
from arpo_fast.train import build
from arpo_fast.train.loop import main

DEEP = "[" * 50 + "]" * 50


@pytest.fixture
def no_loading(monkeypatch):
    """A model load (and the demo's warm start in it) fails the test: checks come first."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(build, "load_model", load_model)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tools", "python,serch"], "--tools: no tool named 'serch' (did you mean 'search'?); available: "),
        (
            ["--tool-settings", '{"python": {"sandbx": "auto"}}'],
            "--tool-settings: python: no setting 'sandbx' (did you mean 'sandbox'?)",
        ),
        (
            ["--tool-settings", '{"python": {"timeout_s": "ten"}}'],
            '--tool-settings: python: timeout_s must be a number, got "ten"',
        ),
        (
            ["--tool-settings", '{"python": {"max_processes": 8.5}}'],
            "--tool-settings: python: max_processes must be an integer, got 8.5",
        ),
        (
            ["--tool-settings", '{"python": {"extra_ro_paths": "/data"}}'],
            '--tool-settings: python: extra_ro_paths must be a list of strings, got "/data"',
        ),
        (
            ["--tool-settings", '{"python": {"sandbox": ' + "[" * 20 + "]" * 20 + "}}"],
            "--tool-settings: python: sandbox must be a string, got [[[[",
        ),
        (
            ["--tool-settings", '{"python": {"sandbox": ' + DEEP + "}}"],
            "--tool-settings: JSON nested too deeply",
        ),
        (["--tool-settings", "[" * 100_000 + "]" * 100_000], "--tool-settings: JSON nested too deeply"),
        (["--tool-settings", '{"pyton": {}}'], "not in --tools: pyton (did you mean 'python'?)"),
        (
            [
                "--tools",
                "python,search",
                "--tool-settings",
                '{"search": {"corpus_path": "/no/corpus.jsonl"}}',
            ],
            "--tool-settings: search: corpus_path /no/corpus.jsonl: no such file",
        ),
        (["--tools", "search"], "--tool-settings: search: corpus_path is required"),
        (["--reward-by-source", DEEP], "--reward-by-source: JSON nested too deeply"),
    ],
)
def test_a_bad_tool_setting_is_one_line_before_the_model_loads(tmp_path, capsys, no_loading, argv, message):
    out = tmp_path / "run"
    assert main(["--steps", "1", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and len(err) < 400, err
    assert not out.exists()


def test_a_sandbox_that_cannot_work_here_fails_before_the_model_loads(
    tmp_path, capsys, monkeypatch, no_loading
):
    monkeypatch.setattr(choice, "_CHOSEN", {})  # no choice made earlier in this process
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    out = tmp_path / "run"
    assert (
        main(["--steps", "1", "--out", str(out), "--tool-settings", '{"python": {"sandbox": "bwrap"}}']) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "--tool-settings: python:" in err and "bubblewrap (bwrap) is not installed" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_the_command_line_says_it_in_one_line(tmp_path):
    """As a user sees it: the default warm start would take minutes; the error comes first."""
    done = subprocess.run(
        [sys.executable, "-m", "arpo_fast.train", "--out", str(tmp_path / "run"), "--tools", "python,serch"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "arpo_fast.train: error: --tools: no tool named 'serch' (did you mean 'search'?); "
        "available: http_search, python, search"
    )
    assert "warm start" not in done.stdout and not (tmp_path / "run").exists()


def test_settings_are_checked_by_name_and_type():
    config = build_settings(PythonToolConfig, {"timeout_s": 3, "extra_ro_paths": ["/usr"], "tmp_root": None})
    assert config.timeout_s == 3 and config.extra_ro_paths == ("/usr",) and config.tmp_root is None
    for settings, message in [
        ({"timeout_s": True}, "timeout_s must be a number, got true"),
        ({"timeout_s": float("nan")}, "timeout_s must be a number, got NaN"),
        ({"tmp_root": 5}, "tmp_root must be a string, got 5"),
        ({"extra_ro_paths": ["/usr", 1]}, "extra_ro_paths must be a list of strings"),
        ({"timeout_s": -1}, "timeout_s must be positive, got -1"),  # the dataclass's own check
    ]:
        with pytest.raises(ValueError, match=message):
            build_settings(PythonToolConfig, settings)
    with pytest.raises(ValueError, match="headers must be an object of strings"):
        check_tool_settings("http_search", url="http://x", headers={"a": 1})
    with pytest.raises(KeyError, match="no tool named 'pythn' \\(did you mean 'python'\\?\\)"):
        create_tool("pythn")
    assert close_match("zzz", ["python", "search"]) == ""


def test_a_tool_registered_without_a_settings_class_is_checked_by_its_signature():
    class Echo:
        name = "echo"

        def __init__(self, prefix: str = "", repeat: Optional[int] = None):
            self.prefix = prefix

    register_tool("echo", Echo, replace=True)
    assert check_tool_settings("echo", prefix=">") is None
    with pytest.raises(ValueError, match="no setting 'prefx' \\(did you mean 'prefix'\\?\\)"):
        check_tool_settings("echo", prefx=">")


def test_json_depth_skips_strings():
    assert json_depth('{"a": "[[[[{{{", "b": [1, [2]]}') == 3
    assert json_depth('"\\"[[["') == 0 and json_depth("") == 0
    assert load_json('{"a": [1]}', "--x") == {"a": [1]} and load_json("", "--x") is None
    with pytest.raises(ValueError, match="--x: not valid JSON"):
        load_json("{", "--x")
