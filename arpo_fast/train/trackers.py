"""Where the metrics also go (``--report-to``): TensorBoard and Weights & Biases.

Each tracker gets every metrics row (training steps as ``train/<name>``, evaluations as
``eval/<name>``, at the row's step), the run's settings once at the start, and is closed at the end.
Neither package is required: ``check`` fails before the run starts, with the command that installs
the missing one. W&B runs offline without a network under ``WANDB_MODE=offline`` (its files go to
the run folder's ``wandb/``); a resumed run goes on with the same W&B run.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Protocol

HINTS = {
    "tensorboard": "pip install 'arpo_fast[tensorboard]'",
    "wandb": "pip install 'arpo_fast[wandb]'",
}
WANDB_ID = "wandb-run-id"
"""The file in the run folder that holds the W&B run's id, so that a resumed run logs to it."""


def _import(target: str):
    try:
        if target == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        import wandb

        return wandb
    except ImportError:
        raise ValueError(f"--report-to {target} needs the {target} package: {HINTS[target]}") from None


def check(targets) -> None:
    """Fail at once, naming the flag and the fix, when a target's package is missing."""
    for target in targets:
        _import(target)


def _numbers(row: dict) -> dict[str, float]:
    """The row's finite numbers by their tracker name (``train/reward``, ``eval/accuracy``)."""
    return {
        key if "/" in key else f"train/{key}": value
        for key, value in row.items()
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
    }


class Tracker(Protocol):
    """What the report writes through: a metrics row at a time, then ``close``."""

    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, out: Path, config_text: str):
        self.writer = _import("tensorboard")(str(out / "tensorboard"))
        # indented: TensorBoard renders text as Markdown, and a code block keeps the YAML's lines
        self.writer.add_text("config", "\n".join("    " + line for line in config_text.splitlines()))

    def log(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, config: dict, resumed: bool):
        wandb = _import("wandb")
        id_file = out / WANDB_ID
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "arpo_fast"),
            name=out.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config,
        )

    def log(self, row: dict) -> None:
        self.run.log(_numbers(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg, config_text: str, resumed: bool) -> list[Tracker]:
    """A tracker for each of ``cfg.report_targets``, writing into the run folder ``cfg.out``."""
    out = Path(cfg.out)
    trackers: list[Tracker] = []
    for target in cfg.report_targets:
        if target == "tensorboard":
            trackers.append(TensorBoard(out, config_text))
        else:
            trackers.append(WandB(out, cfg.flat() | {"out": cfg.out}, resumed))
    return trackers
