"""HSDP under torchrun on the CPU (gloo): four processes as 2 replicas x 2 shards, with the
optimizer offloaded during rollouts, train the weights one process trains."""

import subprocess
import sys

import pytest
from test_distributed import STEPS, _ok, _rows, _run, _same_weights, _weights


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    from test_distributed import SCRIPT

    path = tmp_path_factory.mktemp("script") / "train_by_length.py"
    path.write_text(SCRIPT)
    return (str(path),)


def test_two_replicas_of_two_shards_train_the_weights_of_one_process(script, tmp_path):
    args = STEPS + ["--steps", "2", "--prompts-per-step", "4"]
    _ok(_run(0, args + ["--out", str(tmp_path / "one")], script))
    hsdp = args + ["--hsdp-replicas", "2", "--offload-optimizer", "--out", str(tmp_path / "hsdp")]
    _ok(_run(4, hsdp, script))
    one, four = _rows(tmp_path / "one"), _rows(tmp_path / "hsdp")
    for a, b in zip(one, four):
        assert a["reward"] == b["reward"] and a["tokens"] == b["tokens"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4) and a["grad_norm"] > 0
    _same_weights(_weights(tmp_path / "one"), _weights(tmp_path / "hsdp"))


def test_replicas_that_do_not_divide_the_processes_are_one_line(script, tmp_path):
    proc = _run(2, STEPS + ["--hsdp-replicas", "3", "--out", str(tmp_path / "x")], script, timeout=300)
    assert proc.returncode != 0
    assert "--hsdp-replicas 3 must divide the number of processes (2)" in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "arpo_fast.train: error" in line]
    assert len(lines) == 1, proc.stderr[-2000:]


def test_replicas_without_torchrun_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "arpo_fast.train", "--hsdp-replicas", "2", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "arpo_fast.train: error: --hsdp-replicas 2 needs torchrun (one process has no replicas)"
    )
