"""The benchmark harness every script in ``benchmarks/`` uses: timing, tables, and their output.

Timing: :func:`measure` runs a function after warm-up calls, synchronising the device around each
call, and keeps every sample (median and best); :func:`interleave` measures several functions in
turns, so that load from other processes hits each alike (ratios taken in the same run).

Output: a :class:`Section` (title, the machine, the date, the command that produced it, one
paragraph of context, and its :class:`Table` s) prints as the markdown ``RESULTS.md`` holds and is
written as JSON and CSV with ``--json PATH`` / ``--csv PATH`` (see :func:`add_output_args` and
:func:`emit`). ``python benchmarks/harness.py render A.json B.json ...`` prints saved sections,
newest first, as ``RESULTS.md`` orders them.

The pytest-benchmark entry points (``python -m pytest benchmarks/ --benchmark-only``) time with
pytest-benchmark's own fixture; the workloads they time are the same functions the scripts use.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch


def sync() -> None:
    """Wait for the device's queued work (a no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def release() -> None:
    """Free what the last measurement left (collected objects, the CUDA allocator's cached blocks),
    so that the next one starts from the same memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Timing:
    """Wall-clock samples of one measured function, in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median_us(self) -> float:
        return 1e6 * self.median


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and its wall time in seconds, the device synchronised before and after."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def measure(fn: Callable[[], Any], warmup: int = 1, reps: int = 5) -> Timing:
    """Time ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return Timing([timed(fn)[1] for _ in range(reps)])


def interleave(fns: dict[str, Callable[[], Any]], warmup: int = 1, reps: int = 5) -> dict[str, Timing]:
    """Time every function ``reps`` times in turns (A B A B ...), after ``warmup`` rounds of turns."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, Timing] = {name: Timing([]) for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].samples.append(timed(fn)[1])
    return out


# ---------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """Columns and rows of raw values; floats print with 4 significant digits (or ``formats``)."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells for {len(self.columns)} columns {self.columns}")
        self.rows.append(list(cells))

    def cell(self, column: str, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return self.formats.get(column, "{:.4g}").format(value)
        return str(value)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(self.cell(c, v) for c, v in zip(self.columns, row)) + " |")
        return "\n".join(lines)


def machine() -> str:
    """The device the figures come from: the GPU's name, or the CPU's core count and load."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU: {os.cpu_count()}-core {platform.machine()}, load {load:.1f} at the start"


@dataclass
class Section:
    """One section of ``RESULTS.md``: a title, one paragraph of context and its tables."""

    title: str
    context: str
    tables: list[Table] = field(default_factory=list)
    command: str = field(default_factory=lambda: "python " + " ".join(sys.argv))
    machine: str = field(default_factory=machine)
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())

    def table(self, *columns: str, formats: Optional[dict[str, str]] = None) -> Table:
        """A new table of this section (``formats``: format strings of float columns by name)."""
        t = Table(list(columns), formats=dict(formats or {}))
        self.tables.append(t)
        return t

    def markdown(self) -> str:
        head = f"## {self.title} ({self.machine}, {self.date})\n\n`{self.command}`: {self.context}"
        return "\n\n".join([head, *(t.markdown() for t in self.tables)]) + "\n"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Section:
        tables = [Table(t["columns"], t["rows"], t.get("formats", {})) for t in data.get("tables", [])]
        return cls(**{**data, "tables": tables})

    def write_csv(self, path: Path) -> None:
        """Every table, one after the other, each with its header row and a blank line between."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            for i, t in enumerate(self.tables):
                if i:
                    writer.writerow([])
                writer.writerow(t.columns)
                writer.writerows(t.rows)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--csv", type=Path, default=None, help="also write the tables as CSV here")


def save(section: Section, args: Optional[argparse.Namespace]) -> None:
    """Write the section where ``--json``/``--csv`` (:func:`add_output_args`) ask."""
    if args is not None and getattr(args, "json", None):
        args.json.write_text(json.dumps(section.to_json(), indent=1) + "\n")
    if args is not None and getattr(args, "csv", None):
        section.write_csv(args.csv)


def emit(section: Section, args: Optional[argparse.Namespace] = None) -> None:
    """Print the section as markdown and :func:`save` it."""
    print(section.markdown(), flush=True)
    save(section, args)


class SectionError(ValueError):
    """A file that is not a section saved by :func:`save`."""


def load(path: Path) -> Section:
    try:
        return Section.from_json(json.loads(Path(path).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise SectionError(f"{path}: not a benchmark section saved with --json ({exc})") from None


def render(paths: Sequence[Path]) -> str:
    """Saved sections as ``RESULTS.md`` text, newest first (by date; the given order breaks ties)."""
    sections = [load(p) for p in paths]
    order = sorted(range(len(sections)), key=lambda i: (sections[i].date, -i), reverse=True)
    return "\n".join(sections[i].markdown() for i in order)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Print saved benchmark sections as RESULTS.md text.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="sections from --json files, newest first")
    p.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.paths:
        if not path.is_file():
            parser.error(f"no such file: {path}")
    try:
        text = render(args.paths)
    except SectionError as exc:
        parser.error(str(exc))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
