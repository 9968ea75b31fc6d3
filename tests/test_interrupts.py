"""Ctrl-C and SIGTERM: a run stops cleanly, keeps its last complete step in a checkpoint, says in one
line how to resume, and exits 130 / 143; the handler's rules (setup, rollout, update, a second
signal) one by one. The distributed agreement is tested in test_distributed.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from arpo_fast.rollout import RewardResult, register_reward
from arpo_fast.train import interrupts, loop
from arpo_fast.train.checkpoint import find_checkpoint, load_trainer_state
from arpo_fast.train.loop import main


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _deliver(signum):
    os.kill(os.getpid(), signum)
    time.sleep(0.2)  # the handler runs in this (main) thread at the next chance


def test_a_signal_during_setup_stops_at_once():
    with pytest.raises(interrupts.Interrupted) as stop, interrupts.handling():
        _deliver(signal.SIGTERM)
    assert stop.value.setup and stop.value.exit_code == 143
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


def test_a_signal_in_the_rollout_abandons_the_step_at_once():
    with interrupts.handling():
        interrupts.begin_training()
        interrupts.enter_rollout(None)
        with pytest.raises(interrupts.RolloutAbandoned):
            _deliver(signal.SIGINT)
        interrupts.abandoned(None)
        assert interrupts.stopping() == signal.SIGINT


def test_a_signal_elsewhere_lets_the_work_finish_and_a_late_second_one_stops_at_once(monkeypatch):
    with interrupts.handling():
        interrupts.begin_training()
        _deliver(signal.SIGTERM)  # e.g. during the update: nothing is raised
        assert interrupts.stopping() == signal.SIGTERM
        _deliver(signal.SIGTERM)  # the same request again (torchrun forwards it): ignored
        with pytest.raises(interrupts.StepAbandoned):  # the next rollout does not start
            interrupts.enter_rollout(None)
        monkeypatch.setattr(interrupts, "GRACE_S", 0.0)
        with pytest.raises(interrupts.Interrupted) as stop:
            _deliver(signal.SIGINT)
        assert stop.value.at_once and stop.value.signum == signal.SIGTERM


ARGS = [
    "--demo-warm-start",
    "0",
    "--tools",
    "",
    "--eval-data",
    "none",
    "--prompts-per-step",
    "1",
    "--rollouts",
    "2",
    "--initial",
    "1",
    "--max-response-tokens",
    "8",
]


def _rows(out):
    """The steps in metrics.jsonl (a line still being written is skipped)."""
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def _last_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("arpo_fast.train:") == 1, err
    return err.splitlines()[-1]


def test_ctrl_c_in_a_rollout_saves_the_last_complete_step_and_resumes(tmp_path, capsys):
    calls = []

    def reward(text, truth, **kw):  # step 2's first reward is where Ctrl-C comes
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return RewardResult(0.0, "none")

    register_reward("test_ctrl_c", reward, replace=True)
    out = tmp_path / "run"
    argv = ARGS + ["--reward", "test_ctrl_c", "--out", str(out)]
    assert main(argv + ["--steps", "5"]) == 130  # the default --save-every 0
    line = _last_line(capsys)
    assert f"stopped by SIGINT after step 1 of 5; the checkpoint of that step is in {out}" in line
    assert f"run the same command with --out {out} --resume true" in line
    assert load_trainer_state(find_checkpoint(str(out)))["step"] == 1 and _rows(out) == [1]
    assert main(argv + ["--steps", "2", "--resume", "true"]) == 0
    assert _rows(out) == [1, 2]


def test_sigterm_in_the_update_finishes_the_step_then_saves_it(tmp_path, capsys, monkeypatch):
    update = loop.update

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return update(*args, **kwargs)

    monkeypatch.setattr(loop, "update", signalled)
    out = tmp_path / "run"
    assert main(ARGS + ["--reward", "exact_match", "--out", str(out), "--steps", "5"]) == 143
    assert "stopped by SIGTERM after step 1 of 5" in _last_line(capsys)
    assert load_trainer_state(find_checkpoint(str(out)))["step"] == 1 and _rows(out) == [1]


def test_ctrl_c_on_the_command_line(tmp_path):
    """The real thing: a trainer process gets SIGINT once it has finished a step."""
    out = tmp_path / "run"
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "arpo_fast.train", *ARGS, "--steps", "1000", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and _rows(out)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.count("arpo_fast.train:") == 1, err[-2000:]
    step = load_trainer_state(find_checkpoint(str(out)))["step"]
    assert step >= 1 and _rows(out) == list(range(1, step + 1))
    assert f"stopped by SIGINT after step {step} of 1000" in err
