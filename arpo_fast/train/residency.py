"""What of the trainer's state is in device memory in each phase of a step: the memory plan of
``memory.py`` carried out.

- **rollout** (and evaluations): the engine's weights, the KV pool, and the fp32 masters and AdamW
  state unless ``--offload-optimizer`` moved them to CPU memory.
- **update**: the KV pool is given back to torch's allocator (the activations and gradients use
  it), and under torchrun so is the engine's full bf16 copy of the weights: the update runs on the
  shards, and the copy is gathered from them again before the next rollout, which the refresh does
  anyway (allocating it again is all it adds). The optimizer state is back on the device.
- **checkpoint**: the optimizer state and the engine's weights (rank 0 saves them), no KV pool.

The KV pool is sized once, after the optimizer exists: the free memory less the AdamW state not yet
allocated (torch creates it at the first step), the decode workspace and a headroom share; the
pool has that memory only during rollouts, so it may take all of it (half of the free memory at
engine start, before the optimizer state existed, left too little for the update of a 14B model).
Moving a tensor's storage instead of the tensor keeps every object (FSDP2's shards and their
DTensors, the optimizer's state) as it is; only the bytes leave and come back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional, Union

import torch

from arpo_fast.engine import Engine
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.memory import PlanSettings
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.plan_cli import plan_settings
from arpo_fast.train.sharded_policy import ShardedPolicy

Optimizer = Union[MasterWeights, ShardedPolicy]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (its storage is what this rank holds); a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class StorageOffload:
    """The storages of some tensors moved to CPU memory and back, in place: the tensors, and every
    view of the same storage, stay the objects they were; only their bytes leave the device."""

    def __init__(self) -> None:
        self._moved: list[tuple[torch.UntypedStorage, torch.device, torch.Tensor]] = []

    @property
    def offloaded(self) -> bool:
        return bool(self._moved)

    @property
    def nbytes(self) -> int:
        return sum(cpu.numel() for _, _, cpu in self._moved)

    @torch.no_grad()
    def offload(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy each distinct storage of ``tensors`` into (pinned, on CUDA) CPU memory and free it
        on its device. Idempotent: storages already moved are skipped."""
        seen: set[int] = set()
        for t in tensors:
            local = _local(t)
            storage = local.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen or not storage.resizable():
                continue
            seen.add(storage.data_ptr())
            device = local.device
            pin = device.type == "cuda"
            cpu = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin)
            cpu.copy_(_bytes(storage, device))
            storage.resize_(0)
            self._moved.append((storage, device, cpu))

    @torch.no_grad()
    def restore(self) -> None:
        """Every moved storage back on its device, with its bytes."""
        for storage, device, cpu in self._moved:
            storage.resize_(cpu.numel())
            _bytes(storage, device).copy_(cpu, non_blocking=True)
        if any(device.type == "cuda" for _, device, _ in self._moved):
            torch.cuda.synchronize()
        self._moved = []


def optimizer_tensors(optimizer: Optimizer) -> list[torch.Tensor]:
    """The fp32 masters (not the model's own weights: in one process an fp32 model is its own
    master, and the engine runs on it) and every tensor of the AdamW state."""
    if isinstance(optimizer, MasterWeights):
        masters, inner = [optimizer.master[i] for i in optimizer.copied], optimizer.inner
    else:
        masters = [p for p in optimizer.scorer.parameters() if p.requires_grad]  # LoRA: not the base
        inner = optimizer.optimizer
    state = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return masters + state


def pending_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of AdamW state (two moments a parameter) that its first step will allocate."""
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer.optimizer
    params = [p for g in inner.param_groups for p in g["params"] if p not in inner.state]
    return sum(2 * _local(p).numel() * p.element_size() for p in params)


def kv_pool_bytes(
    cfg: TrainConfig, settings: PlanSettings, vocab: int, pending: int, device
) -> Optional[int]:
    """The KV pool's bytes: ``--kv-memory-mb``, else on CUDA what the rollout leaves (see the
    module's docstring), else None (the engine's CPU default)."""
    if cfg.kv_memory_mb:
        return cfg.kv_memory_mb << 20
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    decode = settings.rollout_sequences * vocab * 6  # the step's logits, bf16 and fp32
    budget = int(free + cached - pending - decode - settings.headroom * total)
    if budget <= 0:
        raise ValueError(
            f"--kv-memory-mb auto: the rollout leaves no memory for the KV pool ({budget / 2**30:.1f} "
            "GiB); --plan-memory shows the plan (--offload-optimizer or more GPUs make room)"
        )
    return budget


class Residency:
    """Moves the trainer's state between the phases of a step (see the module's docstring). Each
    call is idempotent, so a phase may be entered from any other."""

    def __init__(self, optimizer: Optimizer, offload: bool):
        self.optimizer, self.offload = optimizer, offload
        self.engine: Optional[Engine] = None
        self.moved = StorageOffload()

    def _engine(self) -> Engine:
        assert self.engine is not None, "build_engine gives the residency its engine before any phase"
        return self.engine

    def _copy_back(self) -> None:
        if isinstance(self.optimizer, ShardedPolicy):  # gathered from the shards, into storage
            self.optimizer.catch_up_rollout_copy()  # allocated again if it was freed

    def offload_optimizer(self) -> None:
        if self.offload:
            self.moved.offload(optimizer_tensors(self.optimizer))

    def rollout(self) -> None:
        """Before a rollout or an evaluation."""
        self.moved.restore()  # the copy is gathered from the masters
        self._copy_back()
        self.offload_optimizer()
        self._engine().reacquire()

    def update(self) -> None:
        """Before the update, once the rollout's sequences are freed."""
        self._engine().release()
        if isinstance(self.optimizer, ShardedPolicy):
            self.optimizer.release_rollout_copy()
        self.moved.restore()

    def checkpoint(self) -> None:
        """Before a checkpoint is saved: the optimizer state and the model's weights."""
        engine = self._engine()
        if not engine.live():  # an abandoned rollout may still hold sequences
            engine.release()
        self.moved.restore()
        self._copy_back()


def build_engine(cfg: TrainConfig, model, tokenizer, optimizer: Optimizer, world: int, device):
    """(engine, residency): the optimizer offloaded first when asked, then the engine with its KV
    pool sized from what is left."""
    residency = Residency(optimizer, cfg.offload_optimizer)
    residency.offload_optimizer()
    pending = 0 if cfg.offload_optimizer else pending_state_bytes(optimizer)
    settings = plan_settings(cfg, world)
    vocab = model.get_output_embeddings().weight.shape[0]
    budget = kv_pool_bytes(cfg, settings, vocab, pending, device)
    kv = {"kv_memory": budget} if budget is not None else {}
    residency.engine = Engine(model, tokenizer=tokenizer, on_pool_exhausted="preempt", **kv)
    return residency.engine, residency
