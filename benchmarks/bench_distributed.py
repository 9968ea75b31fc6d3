"""Training step time: one process against torchrun with one and two processes, same prompts.

    python benchmarks/bench_distributed.py            # the table recorded in RESULTS.md
    python benchmarks/bench_distributed.py --quick    # fewer steps and prompts
    python -m pytest benchmarks/bench_distributed.py --benchmark-only   # whole 3-step runs
    python benchmarks/bench_distributed.py --device cuda --procs 1   # on a GPU: the FSDP2 overhead

Each configuration is a real run of the trainer (``python -m arpo_fast.train``, or the same under
``torchrun``) on the demo model without tools, the same prompts, seeds and settings. The first step
(warm-up: allocations, Triton compilation) is left out; the rest are averaged. ``torchrun
--nproc-per-node 1`` runs the FSDP2 path with a world of one, so against the one-process path it
shows what sharding, the rollout copy and its refresh cost per step; two processes split the prompts.
On a 2-core CPU two processes share the cores, so their speed-up is bounded by the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Section, add_output_args, emit  # noqa: E402 - after sys.path is set

from arpo_fast.train.report import read_rows, split_rows  # noqa: E402


def run(procs: int, args: list[str], out: Path) -> list[dict]:
    """One training run (``procs`` 0: plain python); its training steps' metrics rows. Every process
    runs one CPU thread, as torchrun sets it: for a model this small, more threads per process only
    wait on each other (on a loaded 2-core machine two threads made the one-process rollout 8x
    slower)."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    if procs:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(procs),
            "-m",
            "arpo_fast.train",
        ]
    else:
        cmd = [sys.executable, "-m", "arpo_fast.train"]
    proc = subprocess.run(cmd + args + ["--out", str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return split_rows(read_rows(out))[0]


def trainer_args(steps: int, prompts: int, device: str) -> list[str]:
    """The trainer's flags for every configuration. No warm start: the random model writes to the
    length limit, so every configuration does the same work (a warm start run with another thread
    count would give a slightly different model)."""
    return [
        *("--demo-warm-start", "0", "--tools", "", "--eval-data", "none"),
        *("--steps", str(steps), "--prompts-per-step", str(prompts), "--rollouts", "8", "--initial", "4"),
        *("--max-response-tokens", "64", "--mini-batch-prompts", "4", "--lr", "1e-4", "--device", device),
    ]


def step_seconds(rows: list[dict]) -> float:
    """Mean step time (rollout + reward + update) of the rows."""
    return statistics.mean(r["rollout_s"] + r["reward_s"] + r["update_s"] for r in rows)


# -- pytest-benchmark entry point ----------------------------------------------------------------


@pytest.mark.parametrize("procs", [0, 1, 2], ids=["python", "torchrun_x1", "torchrun_x2"])
def test_training_run(benchmark, procs, tmp_path):
    """A whole 3-step run of 4 prompts (process start-up included: pytest-benchmark times the call);
    the steps' own mean time, as the script reports it, goes into extra_info."""
    out = tmp_path / "run"
    benchmark.group = "trainer, 3 steps of 4 prompts x 8 trajectories on the demo model, CPU"
    rows = benchmark.pedantic(lambda: run(procs, trainer_args(3, 4, "cpu"), out), rounds=1)
    benchmark.extra_info["step_s (steps 2-3)"] = step_seconds(rows[1:])
    assert len(rows) == 3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--procs",
        type=int,
        nargs="*",
        default=None,
        help="torchrun process counts to compare with one plain process (default 1 2)",
    )
    add_output_args(parser)
    a = parser.parse_args()
    steps, prompts = (3, 4) if a.quick else (5, 8)
    procs = a.procs if a.procs is not None else [1, 2]
    args = trainer_args(steps, prompts, a.device)
    section = Section(
        "Distributed training",
        f"{steps} steps of {prompts} prompts x 8 trajectories on the demo model (no warm start, no tools, "
        f"responses up to 64 tokens), one CPU thread per process, steps 2-{steps} averaged; device "
        f"{a.device}.",
    )
    t = section.table(
        "run",
        "tokens",
        "step s",
        "rollout s",
        "update s",
        "refresh MB",
        "refresh s",
        "speed vs one process",
        formats={"tokens": "{:.0f}", "step s": "{:.3f}", "rollout s": "{:.3f}", "update s": "{:.3f}"},
    )
    t.formats.update({"refresh MB": "{:.2f}", "refresh s": "{:.4f}", "speed vs one process": "{:.2f}x"})
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in [0, *procs]:
            rows = run(n, args, Path(tmp) / f"p{n}")[1:]
            step = step_seconds(rows)
            base = base or step
            t.add(
                "python (one process)" if n == 0 else f"torchrun x{n} (FSDP2)",
                statistics.mean(r["response_tokens"] for r in rows),
                step,
                statistics.mean(r["rollout_s"] for r in rows),
                statistics.mean(r["update_s"] for r in rows),
                statistics.mean(r.get("weight_refresh_mb", 0.0) for r in rows),
                statistics.mean(r.get("weight_refresh_s", 0.0) for r in rows),
                base / step,
            )
    emit(section, a)


if __name__ == "__main__":
    main()
