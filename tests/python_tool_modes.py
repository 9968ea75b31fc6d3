"""Shared by the python tool's tests: which sandbox modes work on this machine, and tools in them."""

import os
import shutil
import tempfile
from functools import cache

import pytest

from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
from arpo_fast.rollout.tools.sandbox import SandboxUnavailable

SANDBOXES = ("bwrap", "namespaces", "uid")
"""The isolating modes; ``unsafe`` is tested only where a test says so."""


@cache
def unavailable(mode: str) -> str:
    """Why ``mode`` cannot run here ('' when it can)."""
    try:
        PythonTool(PythonToolConfig(sandbox=mode))
    except SandboxUnavailable as exc:
        return str(exc)
    return ""


def params(modes=SANDBOXES) -> list:
    """pytest params for ``modes``, each skipped (with the reason) where it cannot run."""
    return [
        pytest.param(m, marks=pytest.mark.skipif(bool(unavailable(m)), reason=unavailable(m)[:200]))
        for m in modes
    ]


def make_tool(request, mode: str, **settings) -> PythonTool:
    """A tool in ``mode`` whose per-run host directories (uid, unsafe) go to a fresh folder that an
    unprivileged run uid can enter (pytest's tmp_path is 0700), removed after the test."""
    root = tempfile.mkdtemp(prefix=f"arpo_test_runs_{mode}_")
    os.chmod(root, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    tool = PythonTool(PythonToolConfig(sandbox=mode, tmp_root=root, **settings))
    assert mode in ("auto", tool.mode)
    return tool
