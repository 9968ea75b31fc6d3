"""Training under torchrun on the CPU (gloo): two processes train the same weights as one,
resume (same number of processes, and 2 -> 1), and a failing rank stops every rank with its error.

Each run is a real ``torchrun`` of the trainer's ``main`` on a tiny demo model (no warm start, no
tools), through a script that registers a reward that varies even for an untrained model.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from arpo_fast.train.report import read_rows, split_rows

STEPS = [
    "--demo-warm-start",
    "0",
    "--tools",
    "",
    "--reward",
    "by_length",
    "--prompts-per-step",
    "4",
    "--rollouts",
    "4",
    "--initial",
    "2",
    "--max-response-tokens",
    "10",
    "--mini-batch-prompts",
    "2",
    "--lr",
    "1e-3",
    "--dtype",
    "fp32",
    "--device",
    "cpu",
    "--seed",
    "3",
    "--kl-coef",
    "0.05",
]


# a reward that varies from one trajectory to the next even for an untrained model, so that the
# advantages, and with them the updates, are not zero
SCRIPT = textwrap.dedent("""
    import os, sys
    from arpo_fast.rollout import RewardResult, register_reward
    from arpo_fast.train import main

    def reward(text, truth, **kw):
        if os.environ.get("RANK") == "1" and "--fail-on-rank-1" in sys.argv:
            raise RuntimeError("rank one's reward broke")
        return RewardResult(float(len(text) % 5), "length")

    register_reward("by_length", reward)
    sys.exit(main([a for a in sys.argv[1:] if a != "--fail-on-rank-1"]))
""")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "train_by_length.py"
    path.write_text(SCRIPT)
    return (str(path),)


def _env():
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")  # the PyTorch paths
    env.pop("RANK", None)
    return env


def _run(procs, args, module, timeout=600):
    """``procs`` processes under torchrun (0: plain python); returns the finished process."""
    if procs:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(procs),
            *module,
            *args,
        ]
    else:
        cmd = [sys.executable, *module, *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(out):
    """The training steps' rows (not the held-out evaluations')."""
    return split_rows(read_rows(out))[0]


def _evals(out):
    """The held-out evaluations' rows, by step."""
    return {r["step"]: r for r in split_rows(read_rows(out))[1]}


EVAL_KEYS = (
    "eval/accuracy",
    "eval/format_ok",
    "eval/reward",
    "eval/tool_calls",
    "eval/response_tokens",
    "eval/examples",
)


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint" / "model" / "model.safetensors"))


ROLLOUT_KEYS = (
    "reward",
    "correct",
    "format_ok",
    "trajectories",
    "branch_points",
    "fills",
    "response_tokens",
    "shared_tokens",
    "tokens",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, script):
    """One process and two processes, two steps each, on the same prompts; 40-token micro-batches
    split the trees, so their prompts run apart (in one process when first needed, under torchrun
    up front on every rank)."""
    root = tmp_path_factory.mktemp("dist")
    split = ["--steps", "2", "--micro-batch-tokens", "40"]
    _ok(_run(0, STEPS + split + ["--out", str(root / "one")], script))
    _ok(_run(2, STEPS + split + ["--out", str(root / "two")], script))
    return root


def test_two_processes_train_the_same_weights_as_one(runs):
    one, two = _rows(runs / "one"), _rows(runs / "two")
    for a, b in zip(one, two):
        assert {k: a[k] for k in ROLLOUT_KEYS} == {k: b[k] for k in ROLLOUT_KEYS}
        assert a["optimizer_steps"] == b["optimizer_steps"] == 2
        assert a["forward_tokens"] == b["forward_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["weight_refresh_mb"] > 0  # the rollout copies were refreshed from the shards
        assert b["grad_norm"] > 0 and b["skipped_updates"] == 0  # the weights did move
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)  # the sharded reference copy
    # the evaluations (each rank greedy on its share of the held-out prompts) agree as well
    ea, eb = _evals(runs / "one"), _evals(runs / "two")
    assert sorted(ea) == sorted(eb) == [0, 2]
    for step in ea:
        assert {k: ea[step][k] for k in EVAL_KEYS} == pytest.approx({k: eb[step][k] for k in EVAL_KEYS})
    wa, wb = _weights(runs / "one"), _weights(runs / "two")
    assert wa.keys() == wb.keys()
    _same_weights(wa, wb)


def _same_weights(wa, wb):
    """Equal to fp32 rounding: the ranks' gradients are summed in another order, and AdamW turns a
    rounding-sized gradient into a step of up to lr, so single elements may differ by a fraction of
    lr (1e-3) while the weights as a whole agree to 1e-7."""
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4)
    diff = torch.cat([(wb[k] - wa[k]).abs().flatten() for k in wa])
    assert float(diff.mean()) < 1e-7


def test_resume_under_torchrun_same_world_and_two_to_one(runs, script, tmp_path):
    import shutil

    # one step with two processes, then the second step resumed: with two, and with one process
    _ok(_run(2, STEPS + ["--steps", "1", "--out", str(tmp_path / "a")], script))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _ok(_run(2, STEPS + ["--steps", "2", "--resume", "true", "--out", str(tmp_path / "a")], script))
    _ok(_run(1, STEPS + ["--steps", "2", "--resume", "true", "--out", str(tmp_path / "b")], script))
    whole = _rows(runs / "two")
    for out in (tmp_path / "a", tmp_path / "b"):
        rows = _rows(out)
        assert [r["step"] for r in rows] == [1, 2]
        for a, b in zip(whole, rows):
            assert {k: a[k] for k in ROLLOUT_KEYS} == {k: b[k] for k in ROLLOUT_KEYS}
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        _same_weights(_weights(runs / "two"), _weights(out))
        assert sorted(_evals(out)) == [0, 1, 2]  # the first run's two, the resumed run's last
    # a distributed checkpoint is not resumed by a one-process run, and says how to resume it
    proc = _run(0, STEPS + ["--steps", "3", "--resume", "true", "--out", str(tmp_path / "a")], script)
    assert proc.returncode == 2 and "resume it under torchrun" in proc.stderr


def test_a_setting_that_fails_is_reported_once(script, tmp_path):
    proc = _run(2, STEPS + ["--steps", "1", "--reward", "nope", "--out", str(tmp_path / "r")], script)
    assert proc.returncode != 0
    assert proc.stderr.count("no reward named 'nope'") == 1, proc.stderr[-2000:]


def test_a_failing_rank_stops_every_rank_with_its_message(script, tmp_path):
    """Rank 1's reward raises mid-run: both processes end, non-zero, in bounded time, and the
    failing rank's error is printed once."""
    proc = _run(
        2, STEPS + ["--steps", "2", "--out", str(tmp_path / "f"), "--fail-on-rank-1"], script, timeout=300
    )
    assert proc.returncode != 0
    assert proc.stderr.count("arpo_fast.train: error (rank 1): RuntimeError: rank one's reward broke") == 1
    assert not (tmp_path / "f" / "checkpoint").exists()  # nothing half-written
