"""Builds the C++ unit tests of the forker with CMake and runs them."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_forker_unit_tests(tmp_path):
    build = tmp_path / "build"
    configure = [
        "cmake",
        "-S",
        str(ROOT),
        "-B",
        str(build),
        "-DARPO_BUILD_PYTHON=OFF",
        "-DARPO_BUILD_TESTS=ON",
    ]
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "forker_tests"], check=True, capture_output=True
    )
    result = subprocess.run([str(build / "forker_tests")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "all checks passed" in result.stdout
