"""Checkpoints: the real save path cut short between any two of its file operations, kept
checkpoints, damaged checkpoints, and what a run may find in its folder.

A crash is simulated by an exception that nothing in the trainer catches (a ``BaseException``),
raised from the k-th call of the file operations a save makes (``os.mkdir``, ``os.rename``,
``os.replace``, ``os.unlink``, ``os.rmdir`` and ``torch.save``), and from every call after it: as
after a kill, nothing more happens.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import small_config

from arpo_fast.train.checkpoint import (
    complete_checkpoints,
    find_checkpoint,
    load_model,
    load_optimizer_state,
    validate_checkpoint,
)
from arpo_fast.train.checkpoint_save import Checkpointer
from arpo_fast.train.demo import demo_model, demo_tokenizer
from arpo_fast.train.loop import main, train
from arpo_fast.train.optim import MasterWeights


class Killed(BaseException):
    """The process died here."""


OPS = ("mkdir", "rename", "replace", "unlink", "rmdir")


@contextlib.contextmanager
def dies_at(k: int):
    """File operations raise :class:`Killed` from the ``k``-th on (1-based); yields the count."""
    calls = {"n": 0}
    originals = {name: getattr(os, name) for name in OPS}
    original_save = torch.save

    def wrap(fn):
        def op(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= k:
                raise Killed()
            return fn(*args, **kwargs)

        return op

    for name in OPS:
        setattr(os, name, wrap(originals[name]))
    torch.save = wrap(original_save)
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)
        torch.save = original_save


@pytest.fixture(scope="module")
def parts():
    tokenizer = demo_tokenizer()
    model = demo_model(tokenizer, seed=0)
    return model, tokenizer, MasterWeights(model.parameters(), lr=1e-3)


def _save(parts, out, step, keep, saved_step=None):
    model, tokenizer, optimizer = parts
    with torch.no_grad():  # each step's weights are told apart by one value
        model.lm_head.weight[0, 0] = float(step)
    saver = Checkpointer(out, keep=keep, saved_step=saved_step)
    saver.save(step, model, tokenizer, optimizer, {"step": step})


def _check_loadable(path: Path, step: int):
    """The checkpoint at ``path`` is whole: every part checked and loaded, with that step's weights."""
    state = validate_checkpoint(path)
    assert state["step"] == step
    model = load_model(path, "cpu", torch.float32)
    assert float(model.lm_head.weight[0, 0].detach()) == float(step)
    load_optimizer_state(path, MasterWeights(model.parameters(), lr=1e-3), state)


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("keep", [1, 2])
def test_a_save_cut_short_anywhere_leaves_a_complete_checkpoint(tmp_path, parts, keep):
    base = tmp_path / "base"
    base.mkdir()
    _save(parts, base, 1, keep)
    _save(parts, base, 2, keep)
    shutil.copytree(base, tmp_path / "count")
    with dies_at(10**9) as calls:  # one whole save, to count its operations
        _save(parts, tmp_path / "count", 3, keep)
    total = calls["n"]
    assert total > 5
    seen = set()
    for k in range(1, total + 1):
        work = tmp_path / f"k{k}"
        shutil.copytree(base, work)
        with pytest.raises(Killed), dies_at(k):
            _save(parts, work, 3, keep)
        found = find_checkpoint(str(work))
        step = json.loads((found / "complete.json").read_text())["step"]
        assert step in (2, 3), (k, _names(work))
        _check_loadable(found, step)
        seen.add((step, found.name))
        # the restarted run resumes from it, and its next save is cut short too, at another place
        with pytest.raises(Killed), dies_at(max(1, total - k)):
            _save(parts, work, 4, keep, saved_step=step)
        found = find_checkpoint(str(work))
        assert complete_checkpoints(work)[0][0] in (step, 4)
        _check_loadable(found, complete_checkpoints(work)[0][0])
        # a save that completes tidies up what the cut-short ones left
        _save(parts, work, 5, keep)
        assert find_checkpoint(str(work)) == work / "checkpoint"
        _check_loadable(work / "checkpoint", 5)
        kept = [n for n in _names(work) if n != "checkpoint"]
        assert len(kept) == keep - 1 and all(n.startswith("checkpoint-") for n in kept), _names(work)
        shutil.rmtree(work)
    # the cuts found the newest checkpoint under each of its names along the way
    assert {name for _, name in seen} >= {"checkpoint", "checkpoint.tmp"}
    assert {s for s, _ in seen} == {2, 3}


def test_older_checkpoints_are_kept_as_asked(tmp_path, parts):
    out = tmp_path / "run"
    out.mkdir()
    for step in (1, 2, 3, 4):
        _save(parts, out, step, keep=3)
    assert _names(out) == ["checkpoint", "checkpoint-2", "checkpoint-3"]
    assert [s for s, _ in complete_checkpoints(out)] == [4, 3, 2]
    _check_loadable(out / "checkpoint-2", 2)
    _save(parts, out, 4, keep=3, saved_step=4)  # the step just saved is not written again
    assert _names(out) == ["checkpoint", "checkpoint-2", "checkpoint-3"]
    _save(parts, out, 5, keep=1)
    assert _names(out) == ["checkpoint"]


def _small(out, **kw):  # one two-trajectory tree of short responses per step
    return small_config(
        out, **({"prompts_per_step": 1, "rollouts": 2, "initial": 1, "max_response_tokens": 8} | kw)
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A two-step run with a checkpoint after each step (the newest kept alone)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_small(out, save_every=1))
    return out


def _copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _argv(out, *more):
    return ["--out", str(out), "--demo-warm-start", "0", "--tools", "", "--eval-data", "none", *more]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("damage", ["shorter", "same size"])
def test_a_damaged_checkpoint_is_refused_before_anything_changes(finished, tmp_path, capsys, damage):
    out = _copy(finished, tmp_path)
    weights = out / "checkpoint" / "model" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\x00" * (size if damage == "same size" else 100))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_argv(out, "--resume", "true", "--steps", "3")) == 2
    err = _one_line_error(capsys)
    assert f"checkpoint {out / 'checkpoint'}" in err and "left untouched" in err
    assert ("has 100 bytes" in err) if damage == "shorter" else ("its model" in err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # metrics.jsonl too


def test_a_damaged_optimizer_state_is_refused_before_anything_changes(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    state = out / "checkpoint" / "trainer.pt"
    saved = torch.load(state, weights_only=True)
    first = next(iter(saved["optimizer"]["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3)  # a moment of the wrong shape
    torch.save(saved, state)
    record = json.loads((out / "checkpoint" / "complete.json").read_text())
    record["files"]["trainer.pt"] = state.stat().st_size  # sizes that match: only loading can tell
    (out / "checkpoint" / "complete.json").write_text(json.dumps(record))
    metrics = (out / "metrics.jsonl").read_text()
    assert main(_argv(out, "--resume", "true", "--steps", "3")) == 2
    assert "its optimizer state" in _one_line_error(capsys)
    assert (out / "metrics.jsonl").read_text() == metrics


def test_a_new_run_never_writes_into_a_folder_of_the_user(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text("my own summary")
    assert main(_argv(out, "--steps", "1")) == 2
    err = _one_line_error(capsys)
    assert "not a run folder of arpo_fast" in err and "summary.json" in err
    assert _names(out) == ["summary.json"] and (out / "summary.json").read_text() == "my own summary"


@pytest.mark.parametrize("plant", ["link", "file"])
def test_a_resume_writes_only_into_files_of_its_own(finished, tmp_path, capsys, plant):
    out = _copy(finished, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the run's")
    if plant == "link":
        (out / "summary.json").unlink()
        (out / "summary.json").symlink_to(outside)
    else:
        (out / "notes.txt").write_text("the user's notes")
    metrics = (out / "metrics.jsonl").read_text()
    assert main(_argv(out, "--resume", "true", "--steps", "3")) == 2
    err = _one_line_error(capsys)
    assert ("summary.json is a symbolic link" if plant == "link" else "notes.txt was not written by") in err
    assert outside.read_text() == "not the run's" and (out / "metrics.jsonl").read_text() == metrics
    assert plant == "link" or (out / "notes.txt").read_text() == "the user's notes"


def test_resume_auto_starts_afresh_or_continues(tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an empty folder is fine for a new run, and becomes a run folder
    assert [m["step"] for m in train(_small(out, steps=1, resume="auto"))] == [1]  # nothing to resume
    assert (out / "ARPO_FAST_RUN").is_file()
    assert [m["step"] for m in train(_small(out, steps=2, resume="auto"))] == [2]  # continued
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # a run of ours cut off before its first checkpoint (as by SIGKILL): auto starts it again
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0}) + "\n")
    for path, _ in [(p, None) for p in out.iterdir() if p.name.startswith("checkpoint")]:
        shutil.rmtree(path)
    assert [m["step"] for m in train(_small(out, steps=1, resume="auto"))] == [1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="already holds a run"):
        train(_small(out, steps=1))
