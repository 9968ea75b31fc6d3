"""CPU benchmark (pytest-benchmark): blocked log-prob/entropy vs the plain PyTorch path.

    python -m pytest benchmarks/bench_logprob_entropy.py --benchmark-only

On CPU tensors ``logprob_entropy`` runs its blocked PyTorch path (the Triton kernels are for CUDA;
do not set TRITON_INTERPRET=1 here). Forward + backward through both outputs, fp32, at a size that
runs in seconds: T = 256 tokens, H = 128, V = 16000. GPU figures come from gpu_logprob_entropy.py.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

try:
    from arpo_fast.kernels import logprob_entropy, logprob_entropy_ref
except ImportError:  # a source checkout that was never pip-installed
    sys.path.insert(0, str(ROOT))
    from arpo_fast.kernels import logprob_entropy, logprob_entropy_ref

T, H, V = 256, 128, 16000


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * (3.0 / math.sqrt(H))).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    grads = (torch.randn(T, generator=g), torch.randn(T, generator=g))
    return hidden, weight, targets, grads


def _fwd_bwd(fn, hidden, weight, targets, grads):
    lp, ent = fn(hidden, weight, targets, temperature=0.7)
    return torch.autograd.grad((lp, ent), (hidden, weight), grads)


@pytest.mark.parametrize("name,fn", [("ours", logprob_entropy), ("pytorch", logprob_entropy_ref)])
def test_fwd_bwd(benchmark, inputs, name, fn):
    benchmark.group = f"logprob_entropy fwd+bwd T={T} H={H} V={V} fp32"
    grads = benchmark(_fwd_bwd, fn, *inputs)
    assert grads[0].shape == (T, H) and grads[1].shape == (V, H)


@pytest.mark.parametrize("name,fn", [("ours", logprob_entropy), ("pytorch", logprob_entropy_ref)])
def test_forward(benchmark, inputs, name, fn):
    benchmark.group = f"logprob_entropy forward T={T} H={H} V={V} fp32"
    hidden, weight, targets, _ = inputs
    with torch.no_grad():
        lp, _ = benchmark(fn, hidden, weight, targets, temperature=0.7)
    assert lp.shape == (T,)
