"""What a run leaves behind and shows while it runs.

* ``config.yaml``: the run's settings (``run_config.py``), written when training starts.
* ``metrics.jsonl``: one row per training step, and one row per evaluation whose keys start with
  ``eval/`` (``step`` is the number of steps trained before it: 0 is the starting model).
* ``metrics.png``: reward, held-out accuracy (greedy and sampled), tool calls per trajectory,
  branch points, shared tokens and format rate against the step, redrawn every ``--plot-every``
  steps, after each evaluation and at the end (from ``metrics.jsonl``, so a resumed run draws its
  whole history).
* ``summary.json``: the held-out accuracy at step 0 and at the end, greedy and sampled; the test
  accuracy after the last step (``test_accuracy``: greedy and sampled); the tool calls per
  trajectory at the first and last step, steps, wall seconds, the checkpoint's path and each
  tool's sandbox mode.
* The console: a progress bar over steps with the latest reward, accuracy and tool-call rate when
  stderr is a terminal, one line per step otherwise; one line per evaluation either way.
* ``--report-to tensorboard,wandb``: every number also goes there (``trackers.py``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from arpo_fast.train import run_config, trackers


def check(cfg) -> None:
    """Fail before the run starts when a reporting target or the run's config.yaml cannot be
    written."""
    trackers.check(cfg.report_targets)
    run_config.check_writable(cfg.out)


def read_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Metrics rows apart: (the training steps', the evaluations'), each in order."""
    steps: list[dict] = []
    evals: list[dict] = []
    for r in rows:
        (evals if "eval/accuracy" in r else steps).append(r)
    return steps, evals


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of ``key`` over the rows that have it."""
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


PANELS = (  # title, y-axis label, [(metrics key, label)]
    ("reward (training rollouts)", "per trajectory", [("reward", "mean reward"), ("correct", "correct")]),
    (
        "held-out accuracy",
        "share of answers",
        [("eval/accuracy", "greedy"), ("eval/sampled_accuracy", "sampled (pass@1, mean of k)")],
    ),
    (
        "tool calls per trajectory",
        "calls",
        [("tool_calls_per_traj", "training"), ("eval/tool_calls", "held-out greedy")],
    ),
    ("branch points per step", "branch points", [("branch_points", "branch points")]),
    (
        "tokens shared by branches per step",
        "tokens",
        [("shared_tokens", "shared"), ("response_tokens", "all")],
    ),
    ("format ok", "share well-formed", [("format_ok", "training"), ("eval/format_ok", "held-out greedy")]),
)


def plot(out: Path, rows: list[dict]) -> Path:
    """Draw ``metrics.png`` from metrics rows."""
    path = out / "metrics.png"
    figure(out.name, rows).savefig(path, dpi=80)
    return path


def figure(title: str, rows: list[dict]):
    """The plot of metrics rows as a matplotlib ``Figure`` (no pyplot: nothing global changes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7), layout="constrained")
    sampled = sorted({k for r in rows for k in r if k.startswith("eval/pass@")})
    for i, (title, ylabel, series) in enumerate(PANELS):
        ax = fig.add_subplot(2, 3, i + 1)
        if title == "held-out accuracy":
            series = series + [(k, k[len("eval/") :]) for k in sampled]
        for key, label in series:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, markersize=4, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        elif title == "held-out accuracy":
            ax.text(0.5, 0.5, "no held-out prompts\n(--eval-data)", ha="center", va="center", color="gray")
    fig.suptitle(title, fontsize=11)
    return fig


def summary(rows: list[dict], wall_s: float, checkpoint: Optional[Path]) -> dict:
    steps, evals = split_rows(rows)
    start = next((r for r in evals if r["step"] == 0), None)
    rate = "tool_calls_per_traj"
    return {
        "warm_start_accuracy": start["eval/accuracy"] if start else None,
        "final_accuracy": evals[-1]["eval/accuracy"] if evals else None,
        "warm_start_sampled_accuracy": start.get("eval/sampled_accuracy") if start else None,
        "final_sampled_accuracy": evals[-1].get("eval/sampled_accuracy") if evals else None,
        "final_eval_step": evals[-1]["step"] if evals else None,
        "steps": steps[-1]["step"] if steps else 0,
        "wall_s": round(wall_s, 1),
        "tool_calls_per_trajectory_first": steps[0].get(rate) if steps else None,
        "tool_calls_per_trajectory_last": steps[-1].get(rate) if steps else None,
        "checkpoint": str(checkpoint) if checkpoint else None,
    }


def test_accuracy(row: dict) -> dict:
    """summary.json's ``test_accuracy`` from the test evaluation's row."""
    return {"greedy": row["test/accuracy"], "sampled": row.get("test/sampled_accuracy"), "step": row["step"]}


def eval_line(row: dict) -> str:
    """One evaluation (held-out ``eval/...`` or ``test/...`` keys) as a line of the log."""
    split = "test" if "test/accuracy" in row else "eval"
    where = "test" if split == "test" else "held-out"
    extra = "".join(
        f"  {k[len(split) + 1 :]} {v:.2f}"
        for k, v in row.items()
        if k.startswith((f"{split}/sampled", f"{split}/pass@"))
    )
    return (
        f"{split} @ step {row['step']}: accuracy {row[f'{split}/accuracy']:.2f}{extra}  format "
        f"{row[f'{split}/format_ok']:.2f}  tool calls/answer {row[f'{split}/tool_calls']:.2f}  "
        f"response {row[f'{split}/response_tokens']:.1f} tokens  ({row[f'{split}/examples']} {where}, "
        f"{row[f'{split}/s']:.1f}s)"
    )


def closing_lines(s: dict) -> list[str]:
    """The accuracies of a finished run (``summary.json``'s ``s``), as the console's last lines."""
    lines = []
    for kind, first, last in (
        ("greedy", "warm_start_accuracy", "final_accuracy"),
        ("sampled", "warm_start_sampled_accuracy", "final_sampled_accuracy"),
    ):
        if s.get(last) is not None:
            start = "" if s.get(first) is None else f"{s[first]:.2f} -> "
            lines.append(f"held-out accuracy ({kind}) {start}{s[last]:.2f}")
    test = s.get("test_accuracy")
    if test:
        sampled = "" if test["sampled"] is None else f", sampled {test['sampled']:.2f}"
        lines.append(f"test accuracy: greedy {test['greedy']:.2f}{sampled}")
    return lines


class Reporter:
    """Writes the run's config.yaml, then each row to ``metrics.jsonl`` (and the trackers), shows
    progress, draws the plot every ``--plot-every`` steps, after each evaluation and at the end,
    and the summary at the end. ``line(row, steps)`` formats a step's log line."""

    def __init__(self, cfg, start: int, line: Callable[[dict, int], str], started: Optional[float] = None):
        self.cfg, self.out, self.line = cfg, Path(cfg.out), line
        self.started = time.perf_counter() if started is None else started
        run_config.save(cfg)
        self.trackers = trackers.open_trackers(cfg, run_config.render(cfg), resumed=start > 0)
        self.bar = None
        self.tested: Optional[dict] = None
        self.latest: dict[str, float] = {}
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            # the size given, as tqdm hides its bar where the terminal reports none (a bare pty)
            size = shutil.get_terminal_size()
            self.bar = tqdm(
                total=cfg.steps,
                initial=start,
                desc="train",
                unit="step",
                ncols=size.columns,
                nrows=size.lines,
            )

    def _write(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log(row)

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, row: dict) -> None:
        self._write(row)
        self.latest.update(reward=row["reward"], calls=row.get("tool_calls_per_traj", 0.0))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self.latest, refresh=True)
        else:
            print(self.line(row, self.cfg.steps), flush=True)
        if self.cfg.plot_every and row["step"] % self.cfg.plot_every == 0:
            plot(self.out, read_rows(self.out))

    def evaluation(self, row: dict) -> None:
        self._write(row)
        self.latest["acc"] = row["eval/accuracy"]
        self._say(eval_line(row))
        if self.bar is not None:
            self.bar.set_postfix(self.latest, refresh=True)
        plot(self.out, read_rows(self.out))

    def test(self, row: dict) -> None:
        """The test evaluation after the last step: shown, and kept for ``summary.json`` (not in
        ``metrics.jsonl``, whose evaluations are the held-out set's)."""
        self.tested = test_accuracy(row)
        self._say(eval_line(row))

    def close(self, checkpoint: Optional[Path], extra: Optional[dict] = None) -> dict:
        """Draw the plot, write ``summary.json`` (and return it), with the fields of ``extra`` added;
        close the bar and the trackers."""
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        rows = read_rows(self.out)
        plot(self.out, rows)
        result = {**summary(rows, time.perf_counter() - self.started, checkpoint), **(extra or {})}
        result["test_accuracy"] = self.tested
        (self.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return result
