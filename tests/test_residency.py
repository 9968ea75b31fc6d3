"""The trainer's state moved between a step's phases: storages offloaded and restored in place,
training with the optimizer offloaded during rollouts equal to training without, the KV pool
released during the update, and the pool sized after the optimizer."""

import pytest
import torch
from helpers import small_config
from safetensors.torch import load_file

from arpo_fast.rollout import RewardResult, register_reward
from arpo_fast.train.loop import setup, train
from arpo_fast.train.memory import PlanSettings
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.residency import (
    StorageOffload,
    kv_pool_bytes,
    optimizer_tensors,
    pending_state_bytes,
)

register_reward("length_mod_5", lambda text, truth, **kw: RewardResult(float(len(text) % 5), "length"))


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_storages_leave_and_come_back_in_place_views_and_all():
    a = torch.randn(37)
    view = a[5:20]  # shares a's storage: moved once
    b = torch.randn(3, 11)
    saved = (a.clone(), b.clone())
    moved = StorageOffload()
    moved.offload([a, view, b])
    assert moved.offloaded and moved.nbytes == (37 + 33) * 4
    assert a.untyped_storage().nbytes() == 0 and b.untyped_storage().nbytes() == 0
    moved.offload([a, b])  # idempotent
    assert moved.nbytes == (37 + 33) * 4
    moved.restore()
    assert not moved.offloaded
    assert torch.equal(a, saved[0]) and torch.equal(b, saved[1]) and torch.equal(view, saved[0][5:20])
    a.add_(1)  # the same objects, usable as before
    assert torch.equal(view, saved[0][5:20] + 1)


def test_optimizer_tensors_are_the_masters_and_adamw_state_not_the_model():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = MasterWeights(model.parameters(), lr=1e-2)
    assert pending_state_bytes(opt) == 2 * 4 * (12 + 3)
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.clip_and_step(0)
    opt.zero_grad()
    assert pending_state_bytes(opt) == 0
    tensors = optimizer_tensors(opt)
    ptrs = {t.untyped_storage().data_ptr() for t in tensors}
    assert not ptrs & {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(tensors) == 2 + 2 * 3  # two masters; per master: step, exp_avg, exp_avg_sq


def _cfg(out, **kw):
    settings = {
        "dtype": "bf16",  # fp32 masters distinct from the model's weights
        "lr": 1e-3,
        "reward": "length_mod_5",  # varies for an untrained model: the weights move
    }
    return small_config(out, **(settings | kw))


def test_training_with_the_optimizer_offloaded_equals_training_without(tmp_path, monkeypatch):
    from arpo_fast.train import residency

    calls = []
    offload = residency.StorageOffload.offload
    monkeypatch.setattr(
        residency.StorageOffload, "offload", lambda self, t: calls.append(1) or offload(self, t)
    )
    kept = train(_cfg(tmp_path / "kept"))
    assert not calls
    moved = train(_cfg(tmp_path / "moved", offload_optimizer=True))
    assert len(calls) >= 3  # at setup and before each step's rollout
    assert [r["loss"] for r in moved] == [r["loss"] for r in kept]
    wa = load_file(str(tmp_path / "kept" / "checkpoint" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "moved" / "checkpoint" / "model" / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert any(r["grad_norm"] > 0 for r in kept)


def test_the_kv_pool_is_released_for_the_update_and_taken_back(tmp_path, monkeypatch):
    from arpo_fast.train import update as update_module

    run = setup(_cfg(tmp_path / "run", steps=1))
    seen = []
    real = update_module.update

    def spy(*args, **kw):
        seen.append(run.engine.released)
        return real(*args, **kw)

    monkeypatch.setattr("arpo_fast.train.loop.update", spy)
    from arpo_fast.train.loop import train_step

    train_step(run, 0)
    assert seen == [True]
    run.residency.rollout()
    assert not run.engine.released


def test_the_kv_pool_is_sized_after_the_optimizer_state(monkeypatch):
    """On CUDA (simulated): free memory less the AdamW state to come, the decode workspace and the
    headroom; an explicit --kv-memory-mb wins; no room is one line naming the flag."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * gib)
    cfg, cuda = _cfg("-"), torch.device("cuda")
    s = PlanSettings(rollout_sequences=100)
    got = kv_pool_bytes(cfg, s, vocab=1000, pending=10 * gib, device=cuda)
    assert got == int(41 * gib - 10 * gib - 100 * 1000 * 6 - 0.05 * 80 * gib)
    assert kv_pool_bytes(_cfg("-", kv_memory_mb=64), s, 1000, 10 * gib, cuda) == 64 << 20
    assert kv_pool_bytes(cfg, s, 1000, 0, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="--kv-memory-mb auto: the rollout leaves no memory"):
        kv_pool_bytes(cfg, s, 1000, 50 * gib, cuda)
