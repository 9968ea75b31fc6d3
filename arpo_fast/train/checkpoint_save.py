"""Writing checkpoints (the layout is in ``checkpoint.py``).

A save writes the whole checkpoint into ``checkpoint.tmp`` and finishes it with ``complete.json``
(step and file sizes); then the newest checkpoint so far becomes ``checkpoint-<its step>``,
``checkpoint.tmp`` becomes ``checkpoint``, and kept checkpoints beyond ``--keep-checkpoints`` are
removed, oldest first. A folder without ``complete.json`` is never a checkpoint, so a crash between
any two file operations leaves the newest complete checkpoint findable (``find_checkpoint``), under
whichever name it then has; the next save tidies up what a cut-short one left.

In a distributed run every rank calls :meth:`Checkpointer.save`: rank 0 writes the model, the
tokenizer and every rename, each rank its shards of the trainer state. With ``async_save`` those
shards are staged in memory and written by ``dcp.async_save`` while training goes on; the save is
finished (``complete.json``, renames) when the next one starts or the run ends.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

import torch

from arpo_fast.train.checkpoint import (
    COMPLETE,
    FORMAT,
    LATEST,
    MARKER,
    TMP,
    CheckpointError,
    check_checkpoint_names,
    checkpoint_paths,
    complete_checkpoints,
    complete_step,
    dcp_cause,
    is_empty_folder,
    no_progress_bars,
    removable,
    remove_checkpoint,
)


def _write_complete(folder: Path, step: int) -> None:
    """``complete.json`` with every file's size, whole or not at all (written, synced, renamed)."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    part = folder / (COMPLETE + ".part")
    with open(part, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "step": step, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, folder / COMPLETE)


def _rotate(out: Path, keep: int) -> None:
    """Make the complete ``checkpoint.tmp`` the newest ``checkpoint``; the one it replaces is kept
    as ``checkpoint-<step>``, and kept ones beyond ``keep`` in all are removed."""
    latest = out / LATEST
    if os.path.lexists(latest):
        step = complete_step(latest)
        if step is None:
            raise CheckpointError(f"{latest} has no {COMPLETE}: it was left untouched; move it away")
        kept = out / f"{LATEST}-{step}"
        if os.path.lexists(kept):
            remove_checkpoint(kept)  # the same step saved twice: the older copy goes
        os.rename(latest, kept)
    os.rename(out / TMP, latest)
    for _, path in complete_checkpoints(out)[keep:]:
        remove_checkpoint(path)


def tidy(out: Path, keep: int) -> None:
    """Finish what a save cut short left: a complete ``checkpoint.tmp`` is swapped in, and folders
    of ours that are no checkpoint (a save or a removal cut short) are removed. The newest
    ``checkpoint`` is never removed here."""
    for path in checkpoint_paths(out):
        cut_short = path.name != LATEST and removable(path) and complete_step(path) is None
        if cut_short or is_empty_folder(path):
            remove_checkpoint(path)
    if os.path.lexists(out / TMP):
        _rotate(out, keep)
    else:
        for _, path in complete_checkpoints(out)[keep:]:
            remove_checkpoint(path)


class Checkpointer:
    """Saves a run's checkpoints into ``out`` (see the module's docstring).

    ``dist``: the run's ``distributed.Dist`` (None: one process); ``keep``: complete checkpoints
    kept; ``saved_step``: the step of the checkpoint the run resumed from (saving it again is
    skipped); ``lora``: a LoRA run's ``lora_run.files`` (the adapter is saved, not the model)."""

    def __init__(
        self, out, dist=None, *, keep: int = 1, async_save: bool = False, saved_step=None, lora=None
    ):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.out, self.dist, self.keep = Path(out), dist, keep
        self.async_save = async_save and dist is not None
        self.saved_step: Optional[int] = saved_step
        self._pending: Optional[tuple[int, Future]] = None  # (step, DCP's save under way)
        self.lora: Optional[dict] = lora
        self.seconds, self.saves = 0.0, 0  # time spent in save() and wait(), and saves written

    @property
    def main(self) -> bool:
        return self.dist is None or self.dist.main

    def save(self, step: int, model, tokenizer, optimizer, config: dict) -> None:
        """Write the checkpoint after ``step`` completed steps (every rank calls this). With
        ``async_save`` the trainer state is still being written on return."""
        self.wait()
        if step == self.saved_step:
            return
        started = time.perf_counter()
        try:
            self._save(step, model, tokenizer, optimizer, config)
        finally:
            self.seconds += time.perf_counter() - started
        self.saves += 1

    def _save(self, step: int, model, tokenizer, optimizer, config: dict) -> None:
        tmp = self.out / TMP
        self._together(lambda: self._begin(step) if self.main else None)
        self._together(lambda: self._write_model(tmp, model, tokenizer) if self.main else None)
        if self.dist is None:
            torch.save(
                {"format": FORMAT, "step": step, "optimizer": optimizer.state_dict(), "config": config},
                tmp / "trainer.pt",
            )
            self._finish(step)
            return
        if self.main:
            world = self.dist.world
            info = {"format": FORMAT, "step": step, "config": config, "world_size": world}
            (tmp / "trainer.json").write_text(json.dumps(info), encoding="utf-8")
        self._save_shards(step, tmp, optimizer.state_dict())

    def wait(self) -> None:
        """Finish an asynchronous save still under way (every rank calls this)."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        started = time.perf_counter()
        try:
            self._together(future.result)
            self._finish(step)
        finally:
            self.seconds += time.perf_counter() - started

    def _begin(self, step: int) -> None:
        check_checkpoint_names(self.out)  # before anything is written: nothing of the user's is touched
        tidy(self.out, self.keep)
        tmp = self.out / TMP
        os.mkdir(tmp)
        (tmp / MARKER).write_text(f"written by arpo_fast after step {step}; removed with its run\n")

    def _write_model(self, tmp: Path, model, tokenizer) -> None:
        if self.lora is not None:
            from arpo_fast.train.lora_run import write

            with no_progress_bars():
                write(tmp, model, tokenizer, **self.lora)
            return
        with no_progress_bars():
            model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")

    def _save_shards(self, step: int, tmp: Path, state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        where = str(tmp / "trainer")
        if self.async_save:  # staged in memory here; written by DCP's thread on its own group
            group = self.dist.save_group
            saving = dcp.async_save(state, checkpoint_id=where, process_group=group)
            # torch's default stager copies in this call, so what comes back is the write's future
            # (an AsyncSaveResponse only with an asynchronous stager, which this does not ask for)
            assert isinstance(saving, Future), f"dcp.async_save returned {type(saving).__name__}"
            self._pending = (step, saving)
            return
        self._together(lambda: dcp.save(state, checkpoint_id=where, process_group=self.dist.setup_group))
        self._finish(step)

    def _finish(self, step: int) -> None:
        """Every rank's part is written: mark the checkpoint complete and swap it in."""

        def finish():
            if self.main:
                _write_complete(self.out / TMP, step)
                _rotate(self.out, self.keep)

        self._together(finish)
        self.saved_step = step

    def _together(self, work) -> None:
        """Run ``work`` on this rank; in a distributed run the ranks then compare notes, and if any
        failed, every rank raises :class:`CheckpointError` with the first failure's message."""
        from torch.distributed.checkpoint.api import CheckpointException

        error = None
        try:
            work()
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - in a distributed run, every kind
            if self.dist is None and not isinstance(exc, CheckpointException):
                raise
            error = _describe(exc)
        if self.dist is not None:
            errors = [e for e in self.dist.gather(error, group=self.dist.setup_group) if e is not None]
            error = errors[0] if errors else None
        if error is not None:
            raise CheckpointError(f"cannot write the checkpoint in {self.out}: {error}")


def _describe(exc: BaseException) -> str:
    from torch.distributed.checkpoint.api import CheckpointException

    cause = dcp_cause(exc) if isinstance(exc, CheckpointException) else exc
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.filename}: {cause.strerror}" if cause.filename else cause.strerror
    text = (str(cause).strip().splitlines() or [""])[0][:200]
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
