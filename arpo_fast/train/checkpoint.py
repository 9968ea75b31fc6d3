"""Checkpoints on disk: their layout, finding the newest complete one, checking and loading it.

A checkpoint folder holds ``model/`` (Hugging Face format, the model and its tokenizer, each
loadable with its Auto class) and the trainer's state: ``trainer.pt`` (step, optimizer and fp32
masters, config) for a one-process run; for a distributed run ``trainer.json`` (step, config, world
size) beside ``trainer/``, the sharded fp32 masters and AdamW state written by
``torch.distributed.checkpoint`` (each rank its shards; a resume with another number of ranks
reshards them).

A LoRA run's checkpoint (``lora_run.py``) holds ``adapter/`` (the adapter in PEFT's format and the
tokenizer) in place of ``model/``, ``base/`` for the demo's base, and ``merged/`` with
``--save-merged``; its base is otherwise ``--model``'s.

Checkpoints written before the tokenizer moved beside the model keep it in ``tokenizer/``; they
still resume. A resumed run loads the tokenizer as the class it was saved as (``build.py``).

Names in the run folder (``checkpoint_save.py`` writes them):

* ``checkpoint``: the newest checkpoint; ``checkpoint-<step>``: older ones kept
  (``--keep-checkpoints``); ``checkpoint.tmp``: the one being written; ``checkpoint.old``: the
  name earlier versions used mid-swap (still read).
* Each folder holds the marker file ``ARPO_FAST_CHECKPOINT`` from its first moment: only a folder
  with it (or an empty one) is ever renamed or removed, and a folder of one of those names that this
  project did not write stops the run with an error instead.
* ``complete.json``, written last (after every rank's shards), records the step and the size of
  every file. A folder is a checkpoint only with it, whatever its name, so a save cut short at any
  moment leaves the newest complete checkpoint findable; the sizes show a file damaged since.

A checkpoint that cannot be used raises :class:`CheckpointError` (one line) and is left as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = 1
MARKER = "ARPO_FAST_CHECKPOINT"
"""The file that marks a folder as a checkpoint written by this project."""
COMPLETE = "complete.json"
"""Written last: the step and every file's size. Without it a folder is no checkpoint."""
LATEST, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
KEPT = re.compile(r"checkpoint-(\d+)")
NAMES = (LATEST, OLD, TMP)
"""The fixed names; older kept checkpoints are ``checkpoint-<step>`` beside them."""


@contextlib.contextmanager
def no_progress_bars():
    """transformers draws a bar over loading and saving, into the run's log: not here."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (or written); nothing was changed."""


def is_checkpoint_name(name: str) -> bool:
    return name in NAMES or KEPT.fullmatch(name) is not None


def checkpoint_paths(out_dir) -> list[Path]:
    """Everything in ``out_dir`` under a checkpoint name (a save may rename or remove it)."""
    out = Path(out_dir)
    if not out.is_dir() or out.is_symlink():
        return []
    return sorted(p for p in out.iterdir() if is_checkpoint_name(p.name))


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder this project wrote (it holds the marker)."""
    marker = path / MARKER
    return path.is_dir() and not path.is_symlink() and marker.is_file() and not marker.is_symlink()


def is_empty_folder(path: Path) -> bool:
    """An empty folder (as a save or a removal cut short may leave): nothing in it to lose."""
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_checkpoint_names(out_dir) -> None:
    """Raise :class:`CheckpointError` if a checkpoint name in ``out_dir`` holds something this
    project did not write (saving would rename or remove it)."""
    for path in checkpoint_paths(out_dir):
        if not is_ours(path) and not is_empty_folder(path):
            raise CheckpointError(
                f"{path} exists but was not written by arpo_fast (no {MARKER} "
                "file): it was left untouched; move it away or choose another --out"
            )


def _record(path: Path) -> Optional[dict]:
    """The ``complete.json`` of a checkpoint folder of ours, or None (no checkpoint, or cut short)."""
    file = path / COMPLETE
    if not is_ours(path) or not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("step"), int)
    return record if ok else None


def complete_step(path: Path) -> Optional[int]:
    """The step of a complete checkpoint, None for anything else. A ``checkpoint`` folder written
    before ``complete.json`` existed counts as complete (it was only ever made by a rename of a
    whole one)."""
    record = _record(path)
    if record is not None:
        return record["step"]
    legacy = path.name == LATEST and is_ours(path)
    if legacy and ((path / "trainer.pt").is_file() or (path / "trainer.json").is_file()):
        return load_trainer_state(path)["step"]
    return None


def complete_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``out_dir``, newest first (at one step,
    ``checkpoint`` before the others)."""
    found = [(step, p) for p in checkpoint_paths(out_dir) if (step := complete_step(p)) is not None]
    return sorted(found, key=lambda sp: (-sp[0], sp[1].name != LATEST, sp[1].name))


def find_checkpoint(out_dir: str) -> Optional[Path]:
    """The newest complete checkpoint under ``out_dir``, or None."""
    found = complete_checkpoints(out_dir)
    return found[0][1] if found else None


def _check_files(path: Path) -> None:
    """Every file listed in ``complete.json`` is there, at the size it was written."""
    record = _record(path) or {}
    for rel, size in sorted(record.get("files", {}).items()):
        file = path / rel
        if not file.is_file() or file.is_symlink():
            raise CheckpointError(
                f"the checkpoint {path} is incomplete: {rel} is missing. It was left untouched, "
                "and so was the run's metrics.jsonl"
            )
        if file.stat().st_size != size:
            raise CheckpointError(
                f"the checkpoint {path} is damaged: {rel} has {file.stat().st_size} bytes, "
                f"{size} when it was written. It was left untouched, and so was the run's metrics.jsonl"
            )


def validate_checkpoint(path: Path, distributed: bool = False) -> dict:
    """The trainer state of checkpoint ``path`` once every part of it is there, at its size, and it
    suits this run (``distributed``: started by torchrun); raises :class:`CheckpointError` naming
    what is wrong, having changed nothing. The weights are checked by loading them
    (:func:`load_model`)."""
    _check_files(path)
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
    parts = _required_parts(Path(path))
    if state.get("sharded"):
        parts.append(("trainer/.metadata", "the sharded trainer state"))
    for part, what in parts:
        if not (Path(path) / part).exists():
            raise CheckpointError(
                f"the checkpoint {path} is incomplete: {what} ({part}) is missing. "
                "It was left untouched, and so was the run's metrics.jsonl"
            )
    weights = Path(path) / ("base" if (Path(path) / "adapter").is_dir() else "model")
    if weights.is_dir() and not any(weights.glob("*.safetensors")) and not any(weights.glob("*.bin")):
        raise CheckpointError(
            f"the checkpoint {path} is incomplete: {weights.name}/ holds no weights. It was "
            "left untouched, and so was the run's metrics.jsonl"
        )
    return state


def _required_parts(path: Path) -> list[tuple[str, str]]:
    """(file, what it is) that the checkpoint ``path`` must hold besides its trainer state."""
    if (path / "adapter").is_dir():  # a LoRA run's (``lora_run.py``)
        from arpo_fast.train.lora_run import required_parts

        return required_parts(path)
    tokenizer = "model/tokenizer_config.json"
    if not (path / tokenizer).exists() and (path / "tokenizer").is_dir():
        tokenizer = "tokenizer"  # written before the tokenizer moved beside the model
    return [("model/config.json", "the model's config"), (tokenizer, "the tokenizer")]


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unusable(path, what: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read the checkpoint {path}: {what} ({_first_line(exc)}). It was left untouched, "
        "and so was the run's metrics.jsonl: move it away to start afresh, or pass another --out"
    )


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
        raise CheckpointError(
            f"cannot read the checkpoint {file} ({_first_line(exc)}). "
            "It was left untouched: move it away to start afresh, or pass another "
            "--out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(
            f"{file} is not an arpo_fast checkpoint of format {FORMAT}; it was left untouched"
        )
    return state


def load_model(path: Path, device, dtype, folder: str = "model"):
    """The checkpoint's model (in ``folder``: a LoRA checkpoint's base is in ``base``), every weight
    read and matched to the model's config: a damaged, truncated or foreign weights file raises
    :class:`CheckpointError`. (Its tokenizer is read before, by ``build.load_tokenizer``.)"""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    try:
        with no_progress_bars():
            # (model, info) with output_loading_info; transformers annotates the model alone
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(path / folder), dtype=dtype, output_loading_info=True
            )
            model, info = loaded
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and transformers raise their own types
        raise _unusable(path, "its model", exc) from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            names = ", ".join(str(k) for k in list(info[kind])[:3])
            raise CheckpointError(
                f"cannot read the checkpoint {path}: its model's weights do not match its config "
                f"({kind.replace('_', ' ')}: {names}). It was left untouched, and so was the run's "
                "metrics.jsonl"
            )
    return model.to(device).eval()


def load_optimizer_state(path: Path, optimizer, state: dict) -> None:
    """Restore a one-process run's optimizer (``optim.MasterWeights``) from its trainer state,
    every AdamW moment checked against its parameter's shape."""
    try:
        optimizer.load_state_dict(state["optimizer"])
    except Exception as exc:  # noqa: BLE001 - a foreign or mismatched optimizer state
        raise _unusable(path, "its optimizer state", exc) from None
    for group in optimizer.inner.param_groups:
        for param in group["params"]:
            for name, value in optimizer.inner.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                    raise CheckpointError(
                        f"cannot read the checkpoint {path}: its optimizer state ({name} of shape "
                        f"{tuple(value.shape)} for a parameter of shape {tuple(param.shape)}). It was "
                        "left untouched, and so was the run's metrics.jsonl"
                    )


def load_sharded_state(checkpoint: Path, policy, group=None) -> None:
    """Read a distributed checkpoint's masters and AdamW state into ``policy`` (a
    ``sharded_policy.ShardedPolicy``), resharded for this run's ranks. Every rank raises
    :class:`CheckpointError` if any rank cannot read its part."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = policy.state_dict()
    try:
        dcp.load(state, checkpoint_id=str(Path(checkpoint) / "trainer"), process_group=group)
    except CheckpointException as exc:  # a BaseException: it would pass every `except Exception`
        raise _unusable(checkpoint, "its sharded trainer state", dcp_cause(exc)) from None
    except Exception as exc:  # noqa: BLE001 - raised before DCP's own wrapping (the metadata file)
        raise _unusable(checkpoint, "its sharded trainer state", exc) from None
    policy.load_state_dict(state)


def dcp_cause(exc) -> BaseException:
    """The first rank's own error inside DCP's ``CheckpointException``."""
    failures = getattr(exc, "failures", None) or {}
    for rank in sorted(failures):
        inner = failures[rank]
        return getattr(inner, "exc", inner) if isinstance(inner, BaseException) else exc
    return exc


def removable(path: Path) -> bool:
    """Whether a save may remove ``path``: a folder of ours, or an empty one."""
    return is_ours(path) or is_empty_folder(path)


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint folder of ours (or an empty one): ``complete.json`` first, so a removal
    cut short leaves no folder that looks complete, and the marker last, so what is left is
    still recognisably ours."""
    if is_empty_folder(path):
        os.rmdir(path)
        return
    if not is_ours(path):
        return
    if (path / COMPLETE).exists():
        os.unlink(path / COMPLETE)
    for child in sorted(path.iterdir()):
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            os.unlink(child)
    os.unlink(path / MARKER)
    os.rmdir(path)
