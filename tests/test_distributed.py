"""Training under torchrun on the CPU (gloo): two processes train the same weights as one,
resume (same number of processes, and 2 -> 1), and a failing rank stops every rank with its error.

Each run is a real ``torchrun`` of the trainer's ``main`` on a tiny demo model (no warm start, no
tools), through a script that registers a reward that varies even for an untrained model.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from arpo_fast.train.checkpoint import find_checkpoint, load_trainer_state
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
# advantages, and with them the updates, are not zero. Rank 1 can be made to fail, to be slow in its
# first reward, to start late, or to get SIGTERM at its n-th reward (environment variables below).
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from arpo_fast.rollout import RewardResult, register_reward
    from arpo_fast.train import main

    RANK1 = os.environ.get("RANK") == "1"
    calls = []

    def reward(text, truth, **kw):
        calls.append(1)
        if RANK1 and "--fail-on-rank-1" in sys.argv:
            raise RuntimeError("rank one's reward broke")
        if RANK1 and len(calls) == int(os.environ.get("TEST_SIGTERM_RANK1_AT", "0")):
            os.kill(os.getpid(), signal.SIGTERM)
        if RANK1 and len(calls) == 1:
            time.sleep(float(os.environ.get("TEST_SLOW_RANK1_S", "0")))
        return RewardResult(float(len(text) % 5), "length")

    register_reward("by_length", reward)
    if RANK1:
        time.sleep(float(os.environ.get("TEST_LATE_RANK1_S", "0")))
    sys.exit(main([a for a in sys.argv[1:] if a != "--fail-on-rank-1"]))
""")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "train_by_length.py"
    path.write_text(SCRIPT)
    return (str(path),)


def _env(**extra):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", **extra)  # the PyTorch paths
    env.pop("RANK", None)
    return env


def _run(procs, args, module, timeout=600, env=None, cwd=None):
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
    return subprocess.run(
        cmd, env=_env(**(env or {})), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


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
        assert b["weight_refreshes"] == 1  # once a step, after its last optimizer step
        assert b["grad_norm"] > 0 and b["skipped_updates"] == 0  # the weights did move
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)  # the sharded KL model copy
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
    """One step with two processes, then the second step resumed with two and with one process.
    The first run takes the default --out while rank 1 starts 1.5 s late (both ranks must use rank
    0's folder, not one stamped by their own clock) and writes its trainer state asynchronously
    (dcp.async_save); the resumes use --resume auto."""
    first = _run(
        2,
        STEPS + ["--steps", "1", "--async-save", "true"],
        script,
        env={"TEST_LATE_RANK1_S": "1.5"},
        cwd=tmp_path,
    )
    _ok(first)
    (a,) = (tmp_path / "runs").iterdir()  # one run folder, holding every rank's shards
    b = tmp_path / "b"
    shutil.copytree(a, b)
    _ok(_run(2, STEPS + ["--steps", "2", "--resume", "auto", "--out", str(a)], script))
    _ok(_run(1, STEPS + ["--steps", "2", "--resume", "auto", "--out", str(b)], script))
    whole = _rows(runs / "two")
    for out in (a, b):
        rows = _rows(out)
        assert [r["step"] for r in rows] == [1, 2]
        for x, y in zip(whole, rows):
            assert {k: x[k] for k in ROLLOUT_KEYS} == {k: y[k] for k in ROLLOUT_KEYS}
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
        _same_weights(_weights(runs / "two"), _weights(out))
        assert sorted(_evals(out)) == [0, 1, 2]  # the first run's two, the resumed run's last
    # a distributed checkpoint is not resumed by a one-process run, and says how to resume it
    proc = _run(0, STEPS + ["--steps", "3", "--resume", "true", "--out", str(a)], script)
    assert proc.returncode == 2 and "resume it under torchrun" in proc.stderr
    # a damaged shard (its size unchanged): DCP's CheckpointException becomes one line, nothing changes
    shard = sorted((a / "checkpoint" / "trainer").glob("*.distcp"))[0]
    shard.write_bytes(b"\x00" * shard.stat().st_size)
    metrics = (a / "metrics.jsonl").read_text()
    proc = _run(2, STEPS + ["--steps", "3", "--resume", "true", "--out", str(a)], script)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("arpo_fast.train:")]
    assert len(errors) == 1 and "its sharded trainer state" in errors[0], proc.stderr[-3000:]
    assert 'Traceback (most recent call last):\n  File "/' not in proc.stderr.split("ChildFailedError")[0]
    assert (a / "metrics.jsonl").read_text() == metrics


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
    assert "error (rank 0)" not in proc.stderr  # not also rank 0's broken connection to rank 1
    assert not (tmp_path / "f" / "checkpoint").exists()  # nothing half-written


def test_a_rank_signalled_alone_stops_every_rank_with_a_checkpoint(script, tmp_path):
    """SIGTERM reaches rank 1 alone, in step 2's rollout (its 9th reward: 8 per step): both ranks
    abandon step 2, save step 1 together and exit 143; rank 0 says how to resume, once."""
    out = tmp_path / "s"
    args = STEPS + ["--steps", "5", "--eval-data", "none", "--out", str(out)]
    proc = _run(2, args, script, timeout=300, env={"TEST_SIGTERM_RANK1_AT": "9"})
    assert proc.returncode != 0 and "exitcode: 143" in proc.stderr, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("arpo_fast.train:")]
    assert ours == [
        f"arpo_fast.train: stopped by SIGTERM after step 1 of 5; the checkpoint of that step is in "
        f"{out / 'checkpoint'}; to continue, run the same torchrun command with --out {out} --resume true"
    ], proc.stderr[-3000:]
    assert [r["step"] for r in _rows(out)] == [1]
    state = load_trainer_state(find_checkpoint(str(out)))
    assert state["step"] == 1 and state["world_size"] == 2


def test_a_rollout_wait_past_its_timeout_fails_naming_the_flag(script, tmp_path):
    """Rank 1's first reward takes 8 s; rank 0, done with its rollout, waits 2 s at most."""
    args = STEPS + [
        "--steps",
        "2",
        "--eval-data",
        "none",
        "--rollout-timeout-s",
        "2",
        "--out",
        str(tmp_path / "t"),
    ]
    proc = _run(2, args, script, timeout=300, env={"TEST_SLOW_RANK1_S": "8"})
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("arpo_fast.train:")]
    assert len(ours) == 1 and "error (rank 0)" in ours[0] and "--rollout-timeout-s 2" in ours[0], ours


def _shared_check_rank(rank: int, port: int, root: str) -> None:
    """One of two ranks: --out shared by both, then a folder of its own (as a node-local disk)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from pathlib import Path

    from arpo_fast.train import distributed, run_dir

    d = distributed.init("cpu")
    results = []
    for out in (Path(root) / "shared", Path(root) / f"local{rank}"):
        try:
            run_dir.check_shared(out, d)
            results.append("ok")
        except ValueError as exc:
            results.append(str(exc))
    distributed.close(d)
    (Path(root) / f"result{rank}").write_text("\n".join(results))


def test_out_must_be_seen_by_every_rank(tmp_path):
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_shared_check_rank, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    for rank in (0, 1):
        shared, local = (tmp_path / f"result{rank}").read_text().split("\n")
        assert shared == "ok"
        assert f"--out {tmp_path / f'local{rank}'} must be on a filesystem every node sees" in local
        assert "cannot see what rank(s)" in local
    assert list((tmp_path / "shared").iterdir()) == []  # the markers are gone


def test_timeouts_and_the_flight_recorder(monkeypatch):
    from arpo_fast.train import distributed
    from arpo_fast.train.config import TrainConfig

    cfg = TrainConfig.from_flat(update_timeout_s=30, rollout_timeout_s=900)
    assert distributed.Timeouts.of(cfg) == distributed.Timeouts(setup=1800, rollout=900, update=30)
    cfg = TrainConfig.from_flat(dist_timeout_s=120, update_timeout_s=30)  # the older flag: one for all
    assert distributed.Timeouts.of(cfg) == distributed.Timeouts(120, 120, 120)
    env = {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
    distributed.enable_flight_recorder("gloo", env)
    assert env == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}  # gloo: nothing to record
    distributed.enable_flight_recorder("nccl", env)
    assert int(env["TORCH_FR_BUFFER_SIZE"]) > 0 and int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"  # what the user set stays
    # init on a CUDA device: the recorder is on before the NCCL group exists, each wait its timeout
    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)

    def init_process_group(backend, timeout):
        made.append((backend, timeout.total_seconds(), os.environ.get("TORCH_FR_BUFFER_SIZE")))

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    group = lambda backend, timeout: (backend, timeout.total_seconds())  # noqa: E731 - a stand-in
    monkeypatch.setattr(distributed.dist, "new_group", group)
    for key in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="localhost").items():
        monkeypatch.setenv(key, value)
    d = distributed.init("cuda", distributed.Timeouts(setup=100, rollout=200, update=30), async_save=True)
    assert made == [("nccl", 30, "2000")] and os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert (d.setup_group, d.rollout_group, d.save_group) == (("gloo", 100), ("gloo", 200), ("gloo", 100))
