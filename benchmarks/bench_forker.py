"""Forker benchmarks: fork cost against prefix length, and prepare_step against batch size.

    python benchmarks/bench_forker.py              # prints the table recorded in RESULTS.md
    python -m pytest benchmarks/bench_forker.py    # the same cases under pytest-benchmark

Peers measured in the same run: the pure-Python reference forker, and a dense copy of the prefix's
KV (torch ``clone`` of a Qwen2.5-7B layout: 28 layers, 4 KV heads, head dim 128, bf16), which is
what a branch costs without paged sharing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Section, add_output_args, emit, measure  # noqa: E402 - after sys.path is set

import arpo_fast  # noqa: E402 - after sys.path is set
from arpo_fast.engine.forker_ref import PyKVForker  # noqa: E402 - after sys.path is set

BLOCK = 16
QWEN7B_KV = dict(layers=28, kv_heads=4, head_dim=128)


def _median_us(fn, reps: int) -> float:
    return measure(fn, warmup=1, reps=reps).median_us


def fork_us(impl, prefix_tokens: int, reps: int = 200) -> float:
    """Median time of one fork(seq, 1) of a sequence holding prefix_tokens tokens."""
    f = impl(prefix_tokens // BLOCK + 8, BLOCK)
    parent = f.new_sequence()
    f.append(parent, prefix_tokens)
    children = []
    us = _median_us(lambda: children.append(f.fork(parent, 1)), reps)
    for c in children:
        f.free(c[0])
    return us


def dense_copy_us(prefix_tokens: int, reps: int = 3) -> float:
    """Median time to clone one prefix's K and V over all layers (bf16, [layers, 2, tokens, heads, dim])."""
    shape = (QWEN7B_KV["layers"], 2, prefix_tokens, QWEN7B_KV["kv_heads"], QWEN7B_KV["head_dim"])
    kv = torch.empty(shape, dtype=torch.bfloat16)
    kv.normal_()
    return _median_us(kv.clone, reps)


def prepare_step_us(impl, batch: int, context: int = 4096, reps: int = 30) -> float:
    """Median time of one decode step's prepare_step (one new token each) for batch sequences."""
    per_seq = (context + reps + 2 * BLOCK) // BLOCK
    f = impl(batch * per_seq, BLOCK)
    seqs = np.array([f.new_sequence() for _ in range(batch)], dtype=np.int64)
    for s in seqs:
        f.append(int(s), context - 1)
    ones = np.ones(batch, dtype=np.int64)
    return _median_us(lambda: f.prepare_step(seqs, ones), reps)


def report(prefixes, batches, dense_max: int) -> Section:
    native = arpo_fast.native().KVForker
    section = Section(
        "KV-cache forker",
        "C++ `arpo_fast._C.KVForker` against the pure-Python reference (`PyKVForker`) and a dense "
        "`clone` of the prefix's KV in the Qwen2.5-7B layout (28 layers, 4 KV heads, head dim 128, "
        f"bf16); block size {BLOCK}; medians. Second table: `prepare_step` for one decode step (one "
        "new token per sequence) of B sequences of 4k tokens, which returns the slot mapping, padded "
        "block tables, lengths and copy pairs as numpy arrays.",
    )
    forks = section.table(
        "prefix tokens",
        "blocks",
        "C++ fork (us)",
        "target 5 us + 50 ns/block",
        "Python fork (us)",
        "dense KV clone (us)",
        "clone / C++ fork",
        formats={
            "C++ fork (us)": "{:.2f}",
            "Python fork (us)": "{:.1f}",
            "dense KV clone (us)": "{:.0f}",
            "clone / C++ fork": "{:.0f}x",
        },
    )
    for n in prefixes:
        blocks = n // BLOCK
        ours, ref = fork_us(native, n), fork_us(PyKVForker, n, reps=50)
        target = 5 + 0.05 * blocks
        dense = dense_copy_us(n) if n <= dense_max else float("nan")
        met = "met" if ours <= target else "MISSED"
        forks.add(n, blocks, ours, f"{target:.1f} ({met})", ref, dense, dense / ours)
    steps = section.table(
        "B (x 4k tokens)",
        "C++ prepare_step (us)",
        "Python reference (us)",
        "speed-up",
        "target",
        formats={"C++ prepare_step (us)": "{:.1f}", "Python reference (us)": "{:.0f}", "speed-up": "{:.0f}x"},
    )
    for b in batches:
        ours, ref = prepare_step_us(native, b), prepare_step_us(PyKVForker, b, reps=5)
        goal = "<= 200 us and >= 20x" if b == 1024 else ">= 20x"
        met = ref / ours >= 20 and (b != 1024 or ours <= 200)
        steps.add(b, ours, ref, ref / ours, f"{goal} ({'met' if met else 'MISSED'})")
    return section


# -- pytest-benchmark entry points ---------------------------------------------------------------


def _fork_case(benchmark, impl, prefix_tokens, rounds):
    # Fixed rounds, as fork_us takes them: every fork leaves a live child (freed at the end), and
    # pytest-benchmark's own calibration would make hundreds of thousands of them.
    f = impl(prefix_tokens // BLOCK + 8, BLOCK)
    parent = f.new_sequence()
    f.append(parent, prefix_tokens)
    children = []
    benchmark.group = f"fork one sequence of {prefix_tokens} tokens"
    benchmark.pedantic(lambda: children.append(f.fork(parent, 1)), rounds=rounds, warmup_rounds=1)
    for c in children:
        f.free(c[0])


def test_fork_native_16k(benchmark):
    _fork_case(benchmark, arpo_fast.native().KVForker, 16384, 200)


def test_fork_python_16k(benchmark):
    _fork_case(benchmark, PyKVForker, 16384, 50)


def test_dense_clone_4k(benchmark):
    kv = torch.randn(QWEN7B_KV["layers"], 2, 4096, QWEN7B_KV["kv_heads"], QWEN7B_KV["head_dim"]).bfloat16()
    benchmark.group = "dense clone of a 4096-token prefix's KV (Qwen2.5-7B layout, bf16)"
    benchmark.pedantic(kv.clone, rounds=3, warmup_rounds=1)


def _step_case(benchmark, impl, batch):
    reps = 40
    f = impl(batch * ((4096 + reps * 4) // BLOCK + 2), BLOCK)
    seqs = np.array([f.new_sequence() for _ in range(batch)], dtype=np.int64)
    for s in seqs:
        f.append(int(s), 4095)
    ones = np.ones(batch, dtype=np.int64)
    benchmark.group = f"prepare_step, B sequences of 4k tokens (B = {batch})"
    benchmark.pedantic(f.prepare_step, args=(seqs, ones), rounds=reps, iterations=1)


def test_prepare_step_native_1024(benchmark):
    _step_case(benchmark, arpo_fast.native().KVForker, 1024)


def test_prepare_step_python_256(benchmark):
    _step_case(benchmark, PyKVForker, 256)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prefixes", type=int, nargs="*", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batches", type=int, nargs="*", default=[64, 256, 1024])
    parser.add_argument("--dense-max", type=int, default=65536, help="largest prefix for the dense clone")
    add_output_args(parser)
    args = parser.parse_args()
    emit(report(args.prefixes, args.batches, args.dense_max), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
