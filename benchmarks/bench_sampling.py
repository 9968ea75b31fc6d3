"""CPU benchmark (pytest-benchmark): the sampler's CPU path against PyTorch samplers.

    python -m pytest benchmarks/bench_sampling.py --benchmark-only

On CPU tensors ``sample`` runs ``sample_ref`` (the Triton kernels are for CUDA; do not set
TRITON_INTERPRET=1 here), so this measures the PyTorch path that the CPU demo uses, against the
usual PyTorch sampler (log_softmax, multinomial, entropy, gather) and the exponential race, at
small sizes: B in {1, 64}, V = 32000, fp32. GPU figures come from gpu_sampling.py.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    from arpo_fast.kernels import sample_ref
except ImportError:  # a source checkout that was never pip-installed
    sys.path.insert(0, str(ROOT))
    from arpo_fast.kernels import sample_ref

from gpu_sampling import exp_race, torch_eager, torch_top_k_top_p  # noqa: E402 - after sys.path is set

V = 32000


def _ours(logits, temps, seeds, pos):
    # ``sample`` itself dispatches here on CPU tensors; called directly so a TRITON_INTERPRET=1
    # left in the environment does not send it through the interpreter.
    return sample_ref(logits, temps, seeds, pos)


def _ours_top(logits, temps, seeds, pos):
    return sample_ref(logits, temps, seeds, pos, top_k=50, top_p=0.9)


PEERS = {
    "ours": _ours,
    "pytorch_eager": lambda logits, temps, seeds, pos: torch_eager(logits, temps),
    "exp_race": lambda logits, temps, seeds, pos: exp_race(logits, temps),
    "ours_top_k_top_p": _ours_top,
    "pytorch_top_k_top_p": lambda logits, temps, seeds, pos: torch_top_k_top_p(logits, temps, 50, 0.9),
}


@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("name", list(PEERS))
def test_sample(benchmark, B, name):
    g = torch.Generator().manual_seed(B)
    logits = torch.randn(B, V, generator=g) * 3
    temps = torch.full((B,), 0.8)
    seeds, pos = torch.arange(B), torch.zeros(B, dtype=torch.int64)
    benchmark.group = f"sample B={B} V={V} fp32"
    tokens = benchmark(PEERS[name], logits, temps, seeds, pos)[0]
    assert tokens.shape == (B,)
