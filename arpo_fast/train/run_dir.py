"""The run folder (``--out``): what a fresh run and a resume may find there, the check that every
rank of a distributed run sees it, and what a run writes into it before its first step.

A run folder is marked as ours by ``ARPO_FAST_RUN`` from the run's first write. A fresh run starts
only in a new or empty folder, or in one of ours that holds no run yet; a resume (or
``--resume auto``) only in a folder of ours that holds nothing but what this project writes, and
no symbolic link anywhere: the run never writes through a link or over a file of the user's.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Optional

from arpo_fast.train.checkpoint import (
    check_checkpoint_names,
    checkpoint_paths,
    find_checkpoint,
    is_checkpoint_name,
    validate_checkpoint,
)

RUN_MARKER = "ARPO_FAST_RUN"
"""The file that marks a folder as a run folder made by this project."""
OUTPUTS = (
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "metrics.png",
    "summary.json",
    "tensorboard",
    "config.yaml",
    "wandb",
    "wandb-run-id",
)
"""Names this project writes into a run folder besides the checkpoints (a writer of a new output
adds its name here, or a resume refuses the folder)."""
SHARED_CHECK = ".arpo_fast_shared_check-"


def is_our_name(name: str) -> bool:
    return name == RUN_MARKER or name in OUTPUTS or is_checkpoint_name(name) or name.startswith(SHARED_CHECK)


def _refuse(out: Path, what: str) -> ValueError:
    return ValueError(f"--out {out}: {what}")


def check_only_ours(out: Path) -> None:
    """Raise ValueError naming the first symbolic link anywhere in ``out``, or the first entry at
    its top that this project does not write; reads only. Inside ``wandb/`` (W&B's own files, with
    its ``latest-run`` link) the run itself never writes, so only that folder itself is checked."""
    for entry in sorted(out.iterdir()):
        if entry.is_symlink():
            raise _refuse(out, f"{entry.name} is a symbolic link; a run writes only into files of its own")
        if not is_our_name(entry.name):
            raise _refuse(
                out,
                f"{entry.name} was not written by arpo_fast; a run continues only in a folder of "
                "its own: move it away",
            )
    for root, dirs, files in os.walk(out):  # links are listed, never followed
        if Path(root) == out and "wandb" in dirs:
            dirs.remove("wandb")
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                what = f"{path.relative_to(out)} is a symbolic link"
                raise _refuse(out, f"{what}; a run writes only into files of its own")


def _is_run_of_ours(out: Path) -> bool:
    marker = out / RUN_MARKER
    return marker.is_file() and not marker.is_symlink()


def _check_fresh(out: Path, resume: Optional[bool]) -> None:
    """A fresh run starts in a new or empty folder, or in one of ours without a run in it (with
    ``--resume auto``: whatever of ours it holds is from steps that will be redone)."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not _is_run_of_ours(out):
        names = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise _refuse(
            out,
            f"not empty ({names}) and not a run folder of arpo_fast; a new run starts in a new or "
            "empty folder: choose another --out",
        )
    check_only_ours(out)
    taken = [p.name for p in (out / "metrics.jsonl", *checkpoint_paths(out)) if os.path.lexists(p)]
    if taken and resume is not None:
        raise ValueError(
            f"{out} already holds a run ({', '.join(taken)}); pass --resume true to "
            "continue it (or --resume auto), or choose another --out"
        )


def check_out(cfg, distributed_run: bool) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to resume from (with its trainer state), or (None, None) for a fresh start,
    after checking that the run may write into ``--out``: a fresh run would overwrite nothing, a
    resumed one finds only files of its own there. Reads only."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    checkpoint = find_checkpoint(cfg.out) if out.is_dir() else None
    if cfg.resume is None and checkpoint is None:  # --resume auto
        _check_fresh(out, None)
        return None, None
    if cfg.resume is False:
        _check_fresh(out, False)
        return None, None
    if checkpoint is None:
        raise ValueError(f"--resume: no checkpoint in {out}")
    check_only_ours(out)
    state = validate_checkpoint(checkpoint, distributed_run)
    check_checkpoint_names(out)  # the next save may rename or remove any of them
    return checkpoint, state


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash (or blank) counts as after all."""
    import json

    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def prepare_out(cfg, state: Optional[dict]) -> None:
    """Make the run's folder and mark it as ours; ``metrics.jsonl`` keeps only the rows of the steps
    a resumed run does not redo (none for a fresh start or a resume from step 0, which redoes the
    step-0 evaluation). Called once everything has been loaded and checked."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / RUN_MARKER
    if not marker.exists():
        marker.write_text("a run folder of arpo_fast: a resume writes only into a folder with this file\n")
    metrics_file = out / "metrics.jsonl"
    if metrics_file.exists():
        last = state["step"] if state is not None else 0
        rows = [
            line
            for line in metrics_file.read_text(encoding="utf-8").splitlines()
            if last > 0 and _step_of(line) <= last
        ]
        tmp = out / "metrics.jsonl.tmp"
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        tmp.replace(metrics_file)  # whole or not at all


def remove_if_unused(out: Path) -> None:
    """Remove a run folder this process made when nothing but its marker is in it (a run that
    failed before its first step); anything else in it stays."""
    try:
        entries = list(out.iterdir())
        if [e.name for e in entries] == [RUN_MARKER] and _is_run_of_ours(out):
            (out / RUN_MARKER).unlink()
        out.rmdir()  # only ever an empty folder
    except OSError:
        pass


def check_shared(out: Path, d) -> None:
    """Under torchrun: every rank writes a marker into ``--out`` and reads rank 0's, and rank 0
    reads every rank's, so a folder that is not on a filesystem every node sees (each rank would
    write its shards into a folder of its own) stops the run before anything else, on every rank
    with the same one-line ValueError. Creates ``--out`` if needed; removes the markers."""
    token = d.broadcast(uuid.uuid4().hex if d.main else None, group=d.setup_group)
    made = None
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            made = f"--out {out}: cannot create it ({exc.strerror})"
    _raise_first(d.gather(made, group=d.setup_group))
    mine = out / f"{SHARED_CHECK}{token[:12]}-{d.rank}"
    host = socket.gethostname()
    try:
        mine.write_text(f"{token} {d.rank}")
        wrote = None
    except OSError as exc:
        wrote = f"rank {d.rank} on {host} cannot write into it ({exc.strerror})"
    d.barrier(group=d.setup_group)  # every marker is written before any is looked for
    unseen = [] if wrote else [r for r in (range(d.world) if d.main else [0]) if not _sees(out, token, r)]
    notes = d.gather((wrote, unseen, host), group=d.setup_group)
    if wrote is None:
        mine.unlink(missing_ok=True)
    for rank, (wrote, unseen, host) in enumerate(notes):
        if wrote or unseen:
            what = wrote or f"rank {rank} on {host} cannot see what rank(s) {unseen} wrote there"
            raise ValueError(
                f"--out {out} must be on a filesystem every node sees (each rank writes its "
                f"checkpoint shards there): {what}"
            )


def _sees(out: Path, token: str, rank: int) -> bool:
    try:
        return (out / f"{SHARED_CHECK}{token[:12]}-{rank}").read_text() == f"{token} {rank}"
    except OSError:
        return False


def _raise_first(errors: list) -> None:
    for error in errors:
        if error is not None:
            raise ValueError(error)
