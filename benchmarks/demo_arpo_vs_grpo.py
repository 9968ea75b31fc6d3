"""The default job as ARPO (its defaults: 16 trajectories per prompt, 8 started, branches after tool
results) and as plain GRPO (``--initial 16``: all 16 started, nothing branches), same warm start,
same data, same seed: tool calls and generated tokens per step, and held-out accuracy.

    python benchmarks/demo_arpo_vs_grpo.py OUTDIR            # runs both (two default jobs' time)
    python benchmarks/demo_arpo_vs_grpo.py --table RUN RUN   # the table of two finished runs

"Tool calls" are calls the trajectories made (a branch shares its source's calls and does not make
them again); the executor also runs an identical call of the same step once, which helps both alike
and is not counted here. "Generated tokens" are the tokens the model sampled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Table  # noqa: E402 - after sys.path is set

from arpo_fast.train.report import read_rows, split_rows  # noqa: E402 - after sys.path is set


def _rows(run: Path) -> tuple[list[dict], list[dict], dict]:
    summary = json.loads((run / "summary.json").read_text())
    return (*split_rows(read_rows(run)), summary)


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def table(runs: dict[str, Path]) -> str:
    t = Table(["", "ARPO", "GRPO", "ARPO / GRPO"])
    data = {name: _rows(path) for name, path in runs.items()}
    (a_steps, a_evals, a_sum), (g_steps, g_evals, g_sum) = data["ARPO"], data["GRPO"]

    def row(label, a, g, fmt="{:.1f}", ratio=True):
        t.add(label, fmt.format(a), fmt.format(g), f"{a / g:.2f}" if ratio and g else "")

    row("trajectories per step", _mean(a_steps, "trajectories"), _mean(g_steps, "trajectories"), "{:.0f}")
    row(
        "tool calls made per step (mean over steps)",
        _mean(a_steps, "tool_calls"),
        _mean(g_steps, "tool_calls"),
    )
    row(
        "tool calls per trajectory's text (mean over steps)",
        _mean(a_steps, "tool_calls_per_traj"),
        _mean(g_steps, "tool_calls_per_traj"),
        "{:.2f}",
    )
    row("generated tokens per step", _mean(a_steps, "model_tokens"), _mean(g_steps, "model_tokens"), "{:.0f}")
    row(
        "branch points per step",
        _mean(a_steps, "branch_points"),
        _mean(g_steps, "branch_points"),
        "{:.1f}",
        False,
    )
    row("rollout seconds per step", _mean(a_steps, "rollout_s"), _mean(g_steps, "rollout_s"), "{:.2f}")
    row(
        "held-out greedy accuracy at step 0",
        a_sum["warm_start_accuracy"],
        g_sum["warm_start_accuracy"],
        "{:.3f}",
        False,
    )
    for a, g in zip(a_evals[1:], g_evals[1:]):
        row(
            f"held-out greedy accuracy after step {a['step']}",
            a["eval/accuracy"],
            g["eval/accuracy"],
            "{:.3f}",
            False,
        )
    row("wall seconds (whole job)", a_sum["wall_s"], g_sum["wall_s"], "{:.0f}")
    return t.markdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", nargs="?", help="folder for the two runs")
    parser.add_argument("--table", nargs=2, metavar=("ARPO_RUN", "GRPO_RUN"), help="only tabulate two runs")
    args, extra = parser.parse_known_args()
    if args.table:
        runs = {"ARPO": Path(args.table[0]), "GRPO": Path(args.table[1])}
    else:
        if not args.out:
            parser.error("give OUTDIR, or --table ARPO_RUN GRPO_RUN")
        runs = {"ARPO": Path(args.out) / "arpo", "GRPO": Path(args.out) / "grpo"}
        for name, path in runs.items():
            flags = ["--initial", "16"] if name == "GRPO" else []
            subprocess.run(
                [sys.executable, "-m", "arpo_fast.train", "--out", str(path), *flags, *extra], check=True
            )
    print(table(runs))


if __name__ == "__main__":
    main()
