"""CPU benchmark: the sampler's CPU path against PyTorch samplers.

    python benchmarks/bench_sampling.py            # the table (medians, interleaved repeats)
    python benchmarks/bench_sampling.py --quick    # fewer repeats
    python -m pytest benchmarks/bench_sampling.py --benchmark-only

On CPU tensors ``sample`` runs ``sample_ref`` (the Triton kernels are for CUDA; do not set
TRITON_INTERPRET=1 here), so this measures the PyTorch path that the CPU demo uses, against the
usual PyTorch sampler (log_softmax, multinomial, entropy, gather) and the exponential race, at
small sizes: B in {1, 64}, V = 32000, fp32. GPU figures come from gpu_sampling.py.
"""

import argparse
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
from harness import Section, add_output_args, emit, interleave  # noqa: E402 - after sys.path is set

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


def inputs(B: int):
    """Logits [B, V] fp32 (scaled so the distribution is peaked), temperatures, seeds, positions."""
    g = torch.Generator().manual_seed(B)
    logits = torch.randn(B, V, generator=g) * 3
    return logits, torch.full((B,), 0.8), torch.arange(B), torch.zeros(B, dtype=torch.int64)


@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("name", list(PEERS))
def test_sample(benchmark, B, name):
    benchmark.group = f"sample B={B} V={V} fp32"
    tokens = benchmark(PEERS[name], *inputs(B))[0]
    assert tokens.shape == (B,)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 30")
    add_output_args(parser)
    args = parser.parse_args()
    reps = 5 if args.quick else 30
    section = Section(
        "Fused sampler (CPU path)",
        f"`sample`'s PyTorch path (token, log-prob and entropy) against PyTorch eager (log_softmax, "
        f"multinomial, entropy, gather) and the exponential race (token only); then top-k 50 / top-p "
        f"0.9 against PyTorch's sort-based filter. V = {V}, fp32, temperature 0.8, torch's default "
        f"threads, median of {reps} interleaved repeats after a warm-up.",
    )
    # speed-up: the PyTorch peer's median over this row's (eager for plain sampling, the sort-based
    # filter for top-k/top-p); above 1 is faster than the peer
    t = section.table("B", "sampler", "median us", "speed-up over peer", formats={"median us": "{:.0f}"})
    t.formats["speed-up over peer"] = "{:.2f}x"
    for B in (1, 64):
        x = inputs(B)
        times = interleave({name: (lambda f=fn: f(*x)) for name, fn in PEERS.items()}, warmup=2, reps=reps)
        peer = {n: times["pytorch_top_k_top_p" if "top" in n else "pytorch_eager"].median for n in times}
        for name, timing in times.items():
            t.add(B, name, timing.median_us, peer[name] / timing.median)
    emit(section, args)


if __name__ == "__main__":
    main()
