"""pytest-benchmark runs of the comparisons in this folder.

    python -m pytest benchmarks/ --benchmark-only                    # every comparison
    python -m pytest benchmarks/ --benchmark-only --benchmark-autosave    # and save the run
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare     # against the last saved run

The scripts are named ``bench_*.py`` (they also run as ``python benchmarks/bench_x.py``), which
pytest does not collect by default; this file collects them when pytest is pointed at this folder.
The project's test command (``python -m pytest -q``, testpaths = tests) never reaches here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the scripts import each other (harness, scripted, ...) by name

# The samplers and kernels run their PyTorch paths on CPU tensors; the Triton interpreter (which
# the test suite turns on) would time the interpreter instead.
os.environ.setdefault("TRITON_INTERPRET", "0")


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_") or file_path.parent != HERE:
        return None
    if parent.session.isinitpath(file_path):  # named on the command line: pytest collects it itself
        return None
    return pytest.Module.from_parent(parent, path=file_path)
