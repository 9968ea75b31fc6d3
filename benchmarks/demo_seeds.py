"""The default job over several seeds and arms: ARPO with the trainer's recomputed old log-probs,
ARPO with the sampler's (``--old-logprobs rollout``), and plain GRPO (``--initial 16``: all 16
trajectories started, nothing branches). Per seed the demo model is warm-started once and each arm
trains a copy of it in this process (``loop.train(cfg, model, tokenizer)``): the same run as
``python -m arpo_fast.train --seed S`` with the arm's flags, less two of the three warm starts.

    OMP_NUM_THREADS=1 python benchmarks/demo_seeds.py OUTDIR --seeds 0 1 2
    python benchmarks/demo_seeds.py OUTDIR --table        # mean and spread of the finished runs

Runs go one after another (seed by seed, every arm of a seed before the next seed), so a
stopped job leaves whole seeds; a run whose summary.json exists is not run again.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

ARMS = {
    "arpo-recompute": dict(old_logprobs="recompute"),
    "arpo-rollout": dict(old_logprobs="rollout"),
    "grpo-recompute": dict(old_logprobs="recompute", initial=16),
}


def run_seed(out: Path, seed: int, arms: list[str]) -> None:
    from arpo_fast.train.config import TrainConfig
    from arpo_fast.train.demo import demo_model, demo_tokenizer, warm_start
    from arpo_fast.train.loop import train

    todo = [a for a in arms if not (out / f"{a}-s{seed}" / "summary.json").exists()]
    if not todo:
        return
    tokenizer = demo_tokenizer()
    warm = demo_model(tokenizer, seed=seed)
    steps = TrainConfig(out="-").demo_warm_start
    warm_start(warm, tokenizer, steps, seed=seed, log=print)
    for arm in todo:
        cfg = TrainConfig.from_flat(seed=seed, out=str(out / f"{arm}-s{seed}"), **ARMS[arm])
        train(cfg, model=copy.deepcopy(warm).eval(), tokenizer=tokenizer)


FIGURES = {  # label: summary.json's key (a dotted path into it)
    "held-out greedy accuracy, end": "final_accuracy",
    "held-out sampled accuracy, end": "final_sampled_accuracy",
    "test greedy accuracy": "test_accuracy.greedy",
    "test sampled accuracy": "test_accuracy.sampled",
    "tool calls per trajectory, last step": "tool_calls_per_trajectory_last",
}
STEP_MEANS = {"tool calls made per step": "tool_calls", "update seconds per step": "update_s"}


def _figures(run: Path) -> dict[str, float]:
    summary = json.loads((run / "summary.json").read_text())
    out = {}
    for label, key in FIGURES.items():
        value = summary
        for part in key.split("."):
            value = (value or {}).get(part)
        out[label] = value
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "eval/accuracy" not in r]
    for label, key in STEP_MEANS.items():
        out[label] = sum(r[key] for r in steps) / len(steps)
    return out


def table(out: Path) -> str:
    """Per arm, each figure's mean and (min-max) over the finished seeds."""
    found = {a: sorted(out.glob(f"{a}-s*/summary.json")) for a in ARMS}
    arms = [a for a in ARMS if found[a]]
    figures = {a: [_figures(p.parent) for p in found[a]] for a in arms}
    lines = ["| | " + " | ".join(f"{a} ({len(found[a])} seeds)" for a in arms) + " |"]
    lines.append("|---" * (len(arms) + 1) + "|")
    for label in [*FIGURES, *STEP_MEANS]:
        cells = []
        for a in arms:
            values = [f[label] for f in figures[a] if f[label] is not None]
            cells.append(
                f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "-"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--table", action="store_true", help="only tabulate the finished runs")
    args = parser.parse_args()
    if not args.table:
        for seed in args.seeds:
            run_seed(args.out, seed, args.arms)
    print(table(args.out))


if __name__ == "__main__":
    main()
