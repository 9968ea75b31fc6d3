"""The GPU report's rows: one row type every ``gpu_*.py`` section returns, its table, and the timing
helpers the sections use (built on ``harness.py``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Table, measure  # noqa: E402 - after sys.path is set

ROOT = Path(__file__).resolve().parent.parent


def load_kernels():
    """``arpo_fast.kernels``, also from a source checkout that was never pip-installed."""
    try:
        from arpo_fast import kernels
    except ImportError:
        # arpo_fast/kernels/__init__.py finds the op modules in kernels/ by itself.
        sys.path.insert(0, str(ROOT))
        from arpo_fast import kernels
    return kernels


ON_ROW: list[Callable[[Row], None]] = []


@dataclass
class Row:
    """One line of the report: what was measured, our figure, the peer's figure and the target."""

    section: str
    case: str
    metric: str
    ours: float
    peer: str = ""
    peer_value: Optional[float] = None
    target: str = ""
    ok: Optional[bool] = None

    def __post_init__(self) -> None:
        for hook in ON_ROW:  # the report prints each row as it is made: a run cut short keeps them
            hook(self)

    @property
    def higher_is_better(self) -> Optional[bool]:
        """From the metric: rates are better high, times, memory and errors low; None where a
        ratio to the peer's figure means nothing (counts checked against an expectation)."""
        if self.metric in ("hits", "chi2 statistic"):
            return None
        return "/s" in self.metric

    def cells(self) -> list[str]:
        ratio = ""
        higher = self.higher_is_better
        if self.peer_value and self.ours and higher is not None:
            ratio = f"{(self.ours / self.peer_value) if higher else (self.peer_value / self.ours):.2f}x"
        verdict = "" if self.ok is None else ("yes" if self.ok else "NO")
        peer_value = "" if self.peer_value is None else f"{self.peer_value:.4g}"
        return [
            self.section,
            self.case,
            self.metric,
            f"{self.ours:.4g}",
            self.peer,
            peer_value,
            ratio,
            self.target,
            verdict,
        ]


# "ours vs peer": how many times better our figure is (> 1: ours is better), by the metric's sense.
HEADER = ["section", "case", "metric", "ours", "peer", "peer value", "ours vs peer", "target", "met"]


def markdown_line(row: Row) -> str:
    return "| " + " | ".join(row.cells()) + " |"


def table(rows: list[Row]) -> Table:
    """The report's rows as a harness table (cells formatted as ``Row.cells`` does)."""
    return Table(list(HEADER), [r.cells() for r in rows])


def markdown(rows: list[Row]) -> str:
    return table(rows).markdown()


def bench_us(fn: Callable[[], object], warmup: int = 5, reps: int = 50) -> float:
    """Median wall time of ``fn`` in microseconds: on CUDA triton's ``do_bench`` (which flushes the
    L2 cache between calls), else ``harness.measure`` (device synchronised around each call)."""
    if torch.cuda.is_available():
        try:
            import triton.testing

            return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception:  # fall back to wall-clock timing below
            pass
    return measure(fn, warmup, reps).median_us


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        nbytes = min(nbytes, 1 << 26)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    return 2 * nbytes / us / 1e3
