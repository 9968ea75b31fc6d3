"""Checkpoints: ``model/`` (Hugging Face format, the model and its tokenizer, each loadable with
its Auto class) and the trainer's state: ``trainer.pt`` (step, optimizer and fp32 masters, config)
for a one-process run; for a distributed run ``trainer.json`` (step, config, world size) beside
``trainer/``, the sharded fp32 masters and AdamW state written by ``torch.distributed.checkpoint``
(each rank its shards; a resume with another number of ranks reshards them).

Checkpoints written before the tokenizer moved beside the model keep it in ``tokenizer/``; they
still resume. A resumed run loads the tokenizer as the class it was saved as (``build.py``).

A checkpoint is written whole into ``checkpoint.tmp`` and then swapped in by renames, so a crash at
any moment leaves the previous checkpoint readable (as ``checkpoint`` or, between the two renames,
``checkpoint.old``). Each checkpoint folder holds a marker file, and only a folder with that marker
is ever removed or renamed: a folder of one of those names that this project did not write stops the
run with an error instead. A checkpoint that cannot be read raises :class:`CheckpointError` and is
left as it is.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

FORMAT = 1
MARKER = "ARPO_FAST_CHECKPOINT"
"""The file that marks a folder as a checkpoint written by this project."""
NAMES = ("checkpoint", "checkpoint.old", "checkpoint.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; nothing was changed."""


@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws a bar over a one-file save, into the run's log: not while saving."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def save_checkpoint(out_dir: str, model, tokenizer, optimizer, step: int, config: dict, dist=None) -> Path:
    """Write the checkpoint after ``step`` completed steps; returns its directory. In a distributed
    run (``dist``) every rank calls this: rank 0 writes the model, the tokenizer and the swap, all
    write their shards of ``optimizer`` (a ``distributed.ShardedPolicy``)."""
    out = Path(out_dir)
    final, tmp, old = (out / name for name in NAMES)
    main = dist is None or dist.main
    if main:
        check_checkpoint_names(out)  # before anything is written: nothing of the user's is touched
        _remove(tmp)
        tmp.mkdir(parents=True)
        (tmp / MARKER).write_text(f"written by arpo_fast after step {step}; removed with its run\n")
        with _no_progress_bars():
            model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
    if dist is None:
        torch.save(
            {"format": FORMAT, "step": step, "optimizer": optimizer.state_dict(), "config": config},
            tmp / "trainer.pt",
        )
    else:
        import torch.distributed.checkpoint as dcp

        dist.barrier()
        dcp.save(optimizer.state_dict(), checkpoint_id=str(tmp / "trainer"))
        if main:
            (tmp / "trainer.json").write_text(
                json.dumps({"format": FORMAT, "step": step, "config": config, "world_size": dist.world})
            )
    if main:
        _remove(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        _remove(old)
    if dist is not None:
        dist.barrier()
    return final


def load_sharded_state(checkpoint: Path, policy) -> None:
    """Read a distributed checkpoint's masters and AdamW state into ``policy`` (a
    ``distributed.ShardedPolicy``), resharded for this run's ranks."""
    import torch.distributed.checkpoint as dcp

    state = policy.state_dict()
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / "trainer"))
    policy.load_state_dict(state)


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder this project wrote (it holds the marker)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def check_checkpoint_names(out_dir) -> None:
    """Raise :class:`CheckpointError` if a checkpoint name in ``out_dir`` holds something this
    project did not write (saving would rename or remove it)."""
    for path in (Path(out_dir) / name for name in NAMES):
        if (path.exists() or path.is_symlink()) and not is_ours(path):
            raise CheckpointError(
                f"{path} exists but was not written by arpo_fast (no {MARKER} "
                "file): it was left untouched; move it away or choose another --out"
            )


def _remove(path: Path) -> None:
    if is_ours(path):
        shutil.rmtree(path)


def validate_checkpoint(path: Path, distributed: bool = False) -> dict:
    """The trainer state of checkpoint ``path`` once every part of it is there and it suits this
    run (``distributed``: started by torchrun); raises :class:`CheckpointError` naming what is
    wrong, having changed nothing."""
    state = load_trainer_state(path)
    if state.get("sharded") and not distributed:
        raise CheckpointError(
            f"the checkpoint {path} was written by a distributed run: resume it "
            "under torchrun (any number of processes, --nproc-per-node 1 included)"
        )
    if distributed and not state.get("sharded"):
        raise CheckpointError(
            f"the checkpoint {path} was written by a one-process run: resume it with "
            "python -m arpo_fast.train"
        )
    tokenizer = "model/tokenizer_config.json"
    if not (Path(path) / tokenizer).exists() and (Path(path) / "tokenizer").is_dir():
        tokenizer = "tokenizer"  # written before the tokenizer moved beside the model
    parts = [("model/config.json", "the model's config"), (tokenizer, "the tokenizer")]
    if state.get("sharded"):
        parts.append(("trainer/.metadata", "the sharded trainer state"))
    for part, what in parts:
        if not (Path(path) / part).exists():
            raise CheckpointError(
                f"the checkpoint {path} is incomplete: {what} ({part}) is missing. "
                "It was left untouched, and so was the run's metrics.jsonl"
            )
    weights = Path(path) / "model"
    if not any(weights.glob("*.safetensors")) and not any(weights.glob("*.bin")):
        raise CheckpointError(
            f"the checkpoint {path} is incomplete: model/ holds no weights. It was "
            "left untouched, and so was the run's metrics.jsonl"
        )
    return state


def find_checkpoint(out_dir: str) -> Optional[Path]:
    """The newest complete checkpoint under ``out_dir``, or None."""
    for name in NAMES[:2]:
        path = Path(out_dir) / name
        if is_ours(path) and ((path / "trainer.pt").exists() or (path / "trainer.json").exists()):
            return path
    return None


def load_trainer_state(path: Path) -> dict:
    """The trainer state of checkpoint ``path``: ``step``, ``config``, and ``optimizer`` (one-process
    runs) or ``sharded`` = True and ``world_size`` (distributed runs: the rest is in ``trainer/``)."""
    sharded = (Path(path) / "trainer.json").exists()
    file = Path(path) / ("trainer.json" if sharded else "trainer.pt")
    try:
        if sharded:
            state = json.loads(file.read_text(encoding="utf-8"))
            state["sharded"] = True
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever broke the file, the user needs the same advice
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read the checkpoint {file} ({type(exc).__name__}: {first}). "
            "It was left untouched: move it away to start afresh, or pass another "
            "--out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(
            f"{file} is not an arpo_fast checkpoint of format {FORMAT}; it was left untouched"
        )
    return state
