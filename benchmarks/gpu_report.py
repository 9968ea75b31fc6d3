"""Every GPU check and comparison of the project, in one call, printed as one table.

    python benchmarks/gpu_report.py            # on a CUDA machine: full sizes
    python benchmarks/gpu_report.py --smoke    # tiny sizes, any machine: checks the script runs
    python benchmarks/gpu_report.py --out report.md   # also write the table (and progress) there

Each row is printed the moment it is measured, so a run cut short still shows what it measured.

Each section lives in ``benchmarks/gpu_<part>.py`` and exposes ``rows(smoke: bool) -> list[Row]``.
A section that fails prints its error and the report goes on with the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Section, add_output_args, save  # noqa: E402 - after sys.path is set

# The real-size step first, then the sections an earlier report left unfinished, then the rest.
SECTIONS = [
    "gpu_step",
    "gpu_update",
    "gpu_distributed",
    "gpu_logprob_entropy",
    "gpu_engine",
    "gpu_forker",
    "gpu_sampling",
    "gpu_train",
]
BUDGET_S = {
    "gpu_step": 240,
    "gpu_update": 90,
    "gpu_distributed": 60,
    "gpu_logprob_entropy": 45,
    "gpu_engine": 60,
}
"""Seconds each section may take before it is stopped (its rows so far are kept), so one slow
section cannot starve the rest; a section not named here gets 60 s. ``--budget-scale`` scales all.
The first five fit one 600 s device call after a minute of GPU tests:
``GPU_TESTS_TIMEOUT=60 REPORT_ARGS="--only gpu_step gpu_update gpu_distributed gpu_logprob_entropy
gpu_engine" bash benchmarks/gpu_check.sh OUTDIR``."""


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise :class:`SectionTimeout` in this (main) thread after ``seconds``; no box where there
    is no SIGALRM or ``seconds`` is 0."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(signum, frame):
        raise SectionTimeout(f"stopped after its {seconds:.0f} s time box")

    before = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on any machine")
    parser.add_argument("--only", nargs="*", default=None, help="run only these sections")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="scale every section's time box (0: no boxes)"
    )
    add_output_args(parser)
    return parser


def main() -> int:
    args = _parser().parse_args()
    if args.smoke:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    import report
    import torch
    import triton
    from report import markdown, markdown_line

    def emit(text: str) -> None:
        print(text, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(text + "\n")

    if args.out is not None:
        args.out.write_text("")
    made: list = []  # every row as it is made: a section stopped by its time box keeps them
    report.ON_ROW.append(lambda row: (made.append(row), emit("row: " + markdown_line(row))))
    head = (
        f"# arpo_fast GPU report\n\ndevice: {device_name()}; torch {torch.__version__}; "
        f"triton {triton.__version__}; date {datetime.date.today()}; "
        f"command: python benchmarks/gpu_report.py{' --smoke' if args.smoke else ''}\n"
    )
    emit(head)
    rows, failures = [], 0
    for name in args.only or SECTIONS:
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                print(f"(section {name}: not present)")
                continue
            raise
        budget = BUDGET_S.get(name, 60) * args.budget_scale
        made.clear()
        try:
            with time_box(budget):
                module.rows(args.smoke)
        except SectionTimeout as exc:
            emit(f"section {name}: {exc}; {len(made)} rows kept")
        except Exception:
            failures += 1
            emit(f"section {name} failed:\n{traceback.format_exc()}")
        rows.extend(made)
        emit(f"(section {name}: {time.perf_counter() - start:.1f} s)")
    missed = [r for r in rows if r.ok is False]
    emit("\n" + head + "\n" + markdown(rows))
    summary = f"{len(rows)} rows, {len(missed)} targets missed, {failures} sections failed"
    emit("\n" + summary)
    save(Section("GPU report", summary + ".", [report.table(rows)], machine=device_name()), args)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
