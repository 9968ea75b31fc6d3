"""Checkpoints: ``model/`` (Hugging Face format, loadable on its own), ``tokenizer/`` and the
trainer's state ``trainer.pt`` (step, optimizer, config).

The tokenizer has a folder of its own: beside a model's ``config.json``, ``AutoTokenizer`` would
pick the tokenizer class of the model type (Qwen2's splits digits apart) over the one saved.

A checkpoint is written whole into ``checkpoint.tmp`` and then swapped in by renames, so a crash at
any moment leaves the previous checkpoint readable (as ``checkpoint`` or, between the two renames,
``checkpoint.old``). A checkpoint that cannot be read raises :class:`CheckpointError` and is left as
it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; nothing was changed."""


def save_checkpoint(out_dir: str, model, tokenizer, optimizer, step: int, config: dict) -> Path:
    """Write the checkpoint after ``step`` completed steps; returns its directory."""
    out = Path(out_dir)
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "tokenizer")
    torch.save({"format": FORMAT, "step": step, "optimizer": optimizer.state_dict(), "config": config},
               tmp / "trainer.pt")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: str) -> Optional[Path]:
    """The newest complete checkpoint under ``out_dir``, or None."""
    for name in ("checkpoint", "checkpoint.old"):
        path = Path(out_dir) / name
        if (path / "trainer.pt").exists():
            return path
    return None


def load_trainer_state(path: Path) -> dict:
    """The trainer state of checkpoint ``path``: ``step``, ``optimizer``, ``config``."""
    file = Path(path) / "trainer.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever broke the file, the user needs the same advice
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read the checkpoint {file} ({type(exc).__name__}: {first}). "
                              "It was left untouched: move it away to start afresh, or pass another "
                              "--out") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file} is not an arpo_fast checkpoint of format {FORMAT}; it was left "
                              "untouched")
    return state
