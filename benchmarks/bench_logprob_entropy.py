"""CPU benchmark: blocked log-prob/entropy vs the plain PyTorch path.

    python benchmarks/bench_logprob_entropy.py            # the table (medians, interleaved repeats)
    python benchmarks/bench_logprob_entropy.py --quick    # fewer repeats
    python -m pytest benchmarks/bench_logprob_entropy.py --benchmark-only

On CPU tensors ``logprob_entropy`` runs its blocked PyTorch path (the Triton kernels are for CUDA;
do not set TRITON_INTERPRET=1 here). Forward + backward through both outputs, fp32, at a size that
runs in seconds: T = 256 tokens, H = 128, V = 16000. GPU figures come from gpu_logprob_entropy.py.
"""

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Section, add_output_args, emit, interleave  # noqa: E402 - after sys.path is set

try:
    from arpo_fast.kernels import logprob_entropy, logprob_entropy_ref
except ImportError:  # a source checkout that was never pip-installed
    sys.path.insert(0, str(ROOT))
    from arpo_fast.kernels import logprob_entropy, logprob_entropy_ref

T, H, V = 256, 128, 16000


def make_inputs():
    """hidden [T, H] and weight [V, H] (fp32, requiring grad), targets [T], output grads ([T], [T])."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * (3.0 / math.sqrt(H))).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    grads = (torch.randn(T, generator=g), torch.randn(T, generator=g))
    return hidden, weight, targets, grads


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


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


def _forward(fn, hidden, weight, targets, grads):
    with torch.no_grad():
        return fn(hidden, weight, targets, temperature=0.7)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 15")
    add_output_args(parser)
    args = parser.parse_args()
    reps = 3 if args.quick else 15
    x = make_inputs()
    section = Section(
        "Training-side log-prob + entropy (CPU path)",
        f"`logprob_entropy` (vocabulary-blocked PyTorch path on CPU tensors) against "
        f"`logprob_entropy_ref` (full [T, V] logits); T = {T}, H = {H}, V = {V}, fp32, temperature "
        f"0.7, torch's default threads, median of {reps} interleaved repeats after a warm-up.",
    )
    t = section.table(
        "pass", "blocked ms", "PyTorch ms", "blocked / PyTorch", formats={"blocked ms": "{:.1f}"}
    )
    t.formats.update({"PyTorch ms": "{:.1f}", "blocked / PyTorch": "{:.2f}x"})
    for name, run in (("forward", _forward), ("forward + backward", _fwd_bwd)):
        fns = {"ours": logprob_entropy, "pytorch": logprob_entropy_ref}
        times = interleave({k: (lambda f=f: run(f, *x)) for k, f in fns.items()}, warmup=1, reps=reps)
        ours, ref = times["ours"].median, times["pytorch"].median
        t.add(name, 1e3 * ours, 1e3 * ref, ours / ref)
    emit(section, args)


if __name__ == "__main__":
    main()
