"""A LoRA run under torchrun on the CPU (gloo): two processes train the adapters one process
trains, refresh only the adapters of their rollout copies, and resume from a checkpoint whose
trainer state holds the adapters and their AdamW state but not the frozen base."""

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import STEPS, _ok, _rows, _run, _same_weights

pytest.importorskip("peft")

LORA = ["--lora-rank", "4", "--eval-data", "none"]
KEYS = ("reward", "trajectories", "response_tokens", "tokens", "optimizer_steps", "forward_tokens")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    from test_distributed import SCRIPT

    path = tmp_path_factory.mktemp("script") / "train_by_length.py"
    path.write_text(SCRIPT)
    return (str(path),)


def _adapter(out):
    return load_file(str(out / "checkpoint" / "adapter" / "adapter_model.safetensors"))


def _megabytes(folder) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def test_two_processes_train_the_adapters_of_one_and_resume(script, tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    _ok(_run(0, STEPS + LORA + ["--steps", "2", "--out", str(one)], script))
    _ok(_run(2, STEPS + LORA + ["--steps", "2", "--out", str(two)], script))
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert {k: x[k] for k in KEYS} == {k: y[k] for k in KEYS}
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4) and x["grad_norm"] > 0
        assert y["kl"] == pytest.approx(x["kl"], rel=1e-4, abs=1e-7)  # the rollout copy's base
        assert y["weight_refreshes"] == 1 and 0 < y["weight_refresh_mb"] < 0.2  # the adapters only
    wa, wb = _adapter(one), _adapter(two)
    assert wa.keys() == wb.keys() and any(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k)
    _same_weights(wa, wb)
    # one step, then the second resumed: the same adapters as the two steps in one go
    _ok(_run(2, STEPS + LORA + ["--steps", "1", "--out", str(resumed)], script))
    trainer = resumed / "checkpoint" / "trainer"
    assert _megabytes(trainer) < _megabytes(resumed / "checkpoint" / "base") / 2  # no base in DCP
    _ok(_run(2, STEPS + LORA + ["--steps", "2", "--resume", "auto", "--out", str(resumed)], script))
    assert [r["step"] for r in _rows(resumed)] == [1, 2]
    for x, y in zip(b, _rows(resumed)):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
    wr = _adapter(resumed)
    assert wr.keys() == wb.keys()
    for k in wb:
        torch.testing.assert_close(wr[k], wb[k], rtol=1e-6, atol=1e-7)
