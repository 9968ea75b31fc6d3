"""Test setup shared by the whole suite.

Triton reads TRITON_INTERPRET when a kernel is *defined*, so it must be set before anything imports
``arpo_fast.kernels``: on a machine without CUDA the kernels then run under the interpreter.

Hypothesis draws the same examples on every run (``derandomize``), so a result does not depend on
the run; ``HYPOTHESIS_PROFILE=explore`` draws fresh ones to look for new failures.
"""

import os
import random

import pytest
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    torch = None
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    yield


@pytest.fixture(scope="module")
def tok():
    """The demo's tokenizer (byte-level BPE trained on the demo's texts), built once per module."""
    from arpo_fast.train.demo import demo_tokenizer

    return demo_tokenizer()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
