"""GPU report section: the distributed trainer's cost on one GPU, and the default job on CUDA.

``torchrun --nproc-per-node 1`` runs the FSDP2 path with a world of one (sharded fp32 masters, a
full bf16 rollout copy refreshed once a step); ``python -m arpo_fast.train`` runs
the one-process path (the engine on the trained weights, fp32 masters beside them). Same demo
settings, prompts and seeds; the first step is left out. Then ``python -m arpo_fast.train`` with
no arguments, as a new user runs it, on CUDA in bf16.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_distributed import run
from harness import timed
from report import Row

SECTION = "distributed"


def rows(smoke: bool) -> list[Row]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps, prompts = (2, 2) if smoke else (4, 8)
    args = [
        "--demo-warm-start",
        "20" if smoke else "200",
        "--tools",
        "",
        "--eval-data",
        "none",
        "--steps",
        str(steps),
        "--prompts-per-step",
        str(prompts),
        "--rollouts",
        "4" if smoke else "16",
        "--initial",
        "2" if smoke else "8",
        "--max-response-tokens",
        "16" if smoke else "128",
        "--device",
        device,
    ]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for procs in (0, 1):
            measured = run(procs, args, Path(tmp) / f"p{procs}")[1:]
            times[procs] = statistics.mean(r["rollout_s"] + r["reward_s"] + r["update_s"] for r in measured)
            if procs:
                refresh_s = statistics.mean(r["weight_refresh_s"] for r in measured)
        case = f"demo steps, {prompts} prompts, {device}"
        out.append(
            Row(
                SECTION,
                case,
                "step s, torchrun x1 (FSDP2)",
                times[1],
                peer="python -m (one process)",
                peer_value=times[0],
                target="overhead = ratio - 1",
            )
        )
        out.append(Row(SECTION, case, "weight refresh s per step", refresh_s))
        out.append(_default_job(Path(tmp) / "job", smoke, device))
    return out


def _default_job(folder: Path, smoke: bool, device: str) -> Row:
    """``python -m arpo_fast.train`` without flags (the built-in job) in ``folder``: its wall time."""
    # a smoke run on the CPU: one step, a short warm start, no evaluation, PyTorch paths (not the
    # Triton interpreter)
    quick = ["--steps", "1", "--demo-warm-start", "20", "--eval-data", "none"] if smoke else []
    env = dict(os.environ, TRITON_INTERPRET="0") if device == "cpu" else None
    job, seconds = timed(
        lambda: subprocess.run(
            [sys.executable, "-m", "arpo_fast.train", "--out", str(folder)] + quick,
            capture_output=True,
            text=True,
            env=env,
        )
    )
    row = Row(
        SECTION,
        "python -m arpo_fast.train (the default job)",
        "wall s",
        seconds,
        target="exits 0",
        ok=job.returncode == 0,
    )
    if job.returncode != 0:
        print(job.stderr[-2000:], flush=True)
    return row
