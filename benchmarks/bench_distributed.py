"""Training step time under torchrun at W = 1, 2 and 4 processes (gloo on a CPU), split by stage.

    python benchmarks/bench_distributed.py            # the table recorded in RESULTS.md
    python benchmarks/bench_distributed.py --quick    # fewer steps
    python benchmarks/bench_distributed.py --procs 0 1 2   # 0: one plain process beside them
    python -m pytest benchmarks/bench_distributed.py --benchmark-only   # whole 3-step runs
    python benchmarks/bench_distributed.py --device cuda --procs 1   # on a GPU: the FSDP2 overhead

Each configuration is a real run of the trainer (``torchrun ... -m arpo_fast.train``, or the plain
``python -m arpo_fast.train``) on the demo model without tools, the same prompts, seeds and
settings, with a checkpoint after every step. The first step (warm-up: allocations, Triton
compilation) is left out; the rest are averaged. A step is split into the rollout (with rewards),
the update (the split of each mini-batch over the ranks and its exchange included), the refresh of
the rollout copy, and the checkpoint (mean over every save, from ``summary.json``). Beside them:
the update's balance (slowest rank's tokens / mean, ``balance.py``) and the bytes moved per step,
the trajectories exchanged (all ranks together) and the refresh (received per rank). FSDP2's own
gathers and reductions are not counted. Mini-batches of 2 prompts, so at W = 4 each mini-batch is
spread over more ranks than it has prompts. On a 2-core CPU the processes share the cores, so the
speed-up is bounded by the machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from arpo_fast.train.report import read_rows, split_rows


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


def _summary(out: Path) -> dict:
    import json

    return json.loads((out / "summary.json").read_text())


COLUMNS = (
    ("run", 22, None),
    ("tokens", 8, "response_tokens"),
    ("step s", 9, "step"),
    ("rollout s", 11, "rollout"),
    ("update s", 10, "update_s"),
    ("refresh s", 11, "weight_refresh_s"),
    ("ckpt s", 8, "checkpoint"),
    ("balance", 9, "update_balance"),
    ("exch MB", 9, "update_exchange_mb"),
    ("refresh MB", 12, "weight_refresh_mb"),
)


def _row(name: str, rows: list[dict], summary: dict) -> dict:
    def mean(key: str) -> float:
        return statistics.mean(r.get(key, 0.0) for r in rows)

    out = {k: mean(k) for _, _, k in COLUMNS[1:] if k not in ("step", "rollout", "checkpoint")}
    if "update_balance" not in rows[0]:  # one rank (or one process): nothing is spread
        out["update_balance"] = out["update_exchange_mb"] = float("nan")
    out["rollout"] = mean("rollout_s") + mean("reward_s")
    out["checkpoint"] = summary["checkpoint_s"] / max(summary["checkpoints"], 1)
    out["step"] = out["rollout"] + out["update_s"] + out["weight_refresh_s"] + out["checkpoint"]
    out["run"] = name
    return out


def _line(values: dict) -> str:
    cells = []
    for _, width, key in COLUMNS:
        v = values[key or "run"]
        cells.append(
            f"{v:<{width}}" if key is None else f"{v:>{width}.{0 if key == 'response_tokens' else 3}f}"
        )
    return "".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--procs", type=int, nargs="*", default=[1, 2, 4], help="torchrun process counts (0: plain python)"
    )
    a = parser.parse_args()
    steps, prompts = (3, 8) if a.quick else (5, 8)
    # no warm start: the random model writes to the length limit, so every configuration does the
    # same work (a warm start run with another thread count would give a slightly different model)
    args = (
        f"--demo-warm-start 0 --tools '' --eval-data none --steps {steps} --prompts-per-step {prompts} "
        "--rollouts 8 --initial 4 --max-response-tokens 64 --mini-batch-prompts 2 --lr 1e-4 "
        f"--save-every 1 --device {a.device}"
    )
    print(f"{steps} steps of {prompts} prompts x 8 trajectories (steps 2.. averaged), device {a.device}")
    print("".join(f"{t:<{w}}" if k is None else f"{t:>{w}}" for t, w, k in COLUMNS))
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.procs:
            out = Path(tmp) / f"p{n}"
            rows = run(n, shlex.split(args), out)[1:]
            row = _row("python (one process)" if n == 0 else f"torchrun x{n}", rows, _summary(out))
            print(_line(row) + (f"   {base / row['step']:.2f}x" if base else ""), flush=True)
            base = base or row["step"]


# -- pytest-benchmark entry point ----------------------------------------------------------------


@pytest.mark.parametrize("procs", [0, 1, 2], ids=["python", "torchrun_x1", "torchrun_x2"])
def test_training_run(benchmark, procs, tmp_path):
    """A whole 3-step run of 4 prompts (process start-up included: pytest-benchmark times the call);
    the steps' own mean time, as the script reports it, goes into extra_info."""
    args = shlex.split(
        "--demo-warm-start 0 --tools '' --eval-data none --steps 3 --prompts-per-step 4 --rollouts 8 "
        "--initial 4 --max-response-tokens 64 --mini-batch-prompts 2 --lr 1e-4 --device cpu"
    )
    benchmark.group = "trainer, 3 steps of 4 prompts x 8 trajectories on the demo model, CPU"
    rows = benchmark.pedantic(lambda: run(procs, args, tmp_path / "run"), rounds=1)
    benchmark.extra_info["step_s (steps 2-3)"] = statistics.mean(
        r["rollout_s"] + r["reward_s"] + r["update_s"] for r in rows[1:]
    )
    assert len(rows) == 3


if __name__ == "__main__":
    main()
