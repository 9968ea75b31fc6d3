"""Data-parallel training under ``torchrun``: one process per device, PyTorch's own stack only.

Rollouts are split by prompt: rank r rolls out the step's prompts r, r + W, r + 2W, ... (W ranks),
each as a whole tree, so group advantages need no communication, and a prompt's tree is seeded by
(seed, step, its position in the step) alone: the same trees whatever the world size.

The update is FSDP2 (``fully_shard`` per decoder layer and on the root): fp32 sharded master
parameters and AdamW state, compute in the rollout dtype (``MixedPrecisionPolicy``), gradients
reduced and accumulated in fp32. FSDP's division of the reduced gradients by the world size is off
at the source (the update's loss is already the mean over every rank's tokens), so the gradient is
the sum over ranks, as torchtitan does it. Each rank's engine runs on a full copy of the weights in the
rollout dtype (:class:`ShardedPolicy.rollout_model`), refreshed in place from the shards after each
optimizer step: the same storage every step, so captured CUDA graphs stay valid.

A plain ``python -m arpo_fast.train`` does not come here: one process keeps the zero-copy path
(the engine on the trained model's own bf16 weights, fp32 masters in ``optim.MasterWeights``).
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the run and the few collectives the trainer uses."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _reduce(self, values: Sequence[float], op) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), on every rank."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def mine(self, n: int) -> list[int]:
        """This rank's share of ``n`` items (prompts of a step): every W-th from its rank on."""
        return list(range(self.rank, n, self.world))


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def env_rank() -> int:
    """This process's rank under torchrun, else 0."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def init(device: str, timeout_s: float) -> Optional[Dist]:
    """Join the process group when started by ``torchrun`` (None otherwise). ``device``: the
    ``--device`` setting; under torchrun a CUDA run uses ``cuda:LOCAL_RANK``. Collectives time out
    after ``timeout_s``, so a rank that hangs cannot hold the others forever."""
    if not launched_by_torchrun():
        return None
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local, dev)


def close(d: Optional[Dist]) -> None:
    if d is not None and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: torch.nn.Module, d: Dist, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` wrapped for the update (``batch.LogprobModel``) and sharded with FSDP2:
    its parameters in ``dtype`` (fp32 masters for the trained policy, the model's own dtype for a
    frozen reference), computing in ``model``'s dtype, gradients reduced in fp32. Rank 0's values
    are the ones every rank gets."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor

    from arpo_fast.train.batch import LogprobModel
    from arpo_fast.train.hf_adapter import decoder_layers

    compute = next(model.parameters()).dtype
    with torch.device("meta"):
        policy = type(model)(model.config)
    for param in policy.parameters():  # buffers (rotary frequencies) keep their own dtype
        param.data = param.data.to(dtype)
    scorer = LogprobModel(policy)
    mp = MixedPrecisionPolicy(param_dtype=None if compute == dtype else compute, reduce_dtype=torch.float32)
    for layer in decoder_layers(policy):
        _sum_gradients(fully_shard(layer, mp_policy=mp))
    _sum_gradients(fully_shard(scorer, mp_policy=mp))
    scorer.to_empty(device=d.device)
    full = dict(model.named_parameters())
    with torch.no_grad():
        for name, part in policy.named_parameters():  # src_data_rank=0: rank 0's values everywhere
            part.copy_(distribute_tensor(full[name].detach().to(dtype), part.device_mesh, part.placements))
        buffers = dict(model.named_buffers())
        for name, buf in policy.named_buffers():  # rotary frequencies: rebuilt, not sharded
            buf.copy_(buffers[name])
    return scorer


def _sum_gradients(module) -> None:
    """Reduce ``module``'s gradients (an FSDP2 unit) as a plain sum over ranks: no division by the
    world size (torch 2.13's ``set_gradient_divide_factor``), and sum-only collectives, which every
    backend has (a divide factor of 1 would otherwise ask for NCCL's pre-multiplied sum)."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


class ShardedPolicy:
    """The trainer's model under FSDP2, beside the full rollout copy the engine runs on.

    ``scorer`` is the policy wrapped for the update (see ``batch.LogprobModel``), sharded in fp32:
    its parameters are the masters. ``step`` and ``zero_grad`` make it usable where the one-process
    trainer uses ``optim.MasterWeights``; after each optimizer step the rollout copy is refreshed.
    """

    def __init__(self, rollout_model: torch.nn.Module, d: Dist, *, lr: float, weight_decay: float):
        self.rollout_model, self.dist = rollout_model, d
        self.scorer = shard(rollout_model, d, torch.float32)
        self.policy = self.scorer.policy
        self.optimizer = torch.optim.AdamW(self.scorer.parameters(), lr=lr, weight_decay=weight_decay)
        full = dict(rollout_model.named_parameters())
        self._pairs = [(s, full[name]) for name, s in self.policy.named_parameters()]
        self.refresh_stats = {"bytes": 0.0, "seconds": 0.0}
        self.refresh()

    def clip_and_step(self, max_norm: float) -> float:
        """Clip the global gradient norm, step AdamW on the shards and refresh the rollout copy;
        returns the norm before clipping. A non-finite norm skips the step on every rank."""
        params = [p for p in self.scorer.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            return norm
        self.optimizer.step()
        self.refresh()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def refresh(self) -> None:
        """Gather the shards in the rollout dtype and copy them into the rollout copy, in place."""
        start = time.perf_counter()
        moved = 0
        for shard, target in self._pairs:
            whole = shard.detach().to(target.dtype).full_tensor()
            target.copy_(whole)
            moved += whole.numel() * whole.element_size()
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        self.refresh_stats["bytes"] += moved * (self.dist.world - 1) / self.dist.world
        self.refresh_stats["seconds"] += time.perf_counter() - start

    def take_refresh_stats(self) -> dict:
        """Bytes each rank received and seconds spent refreshing since the last call."""
        stats, self.refresh_stats = self.refresh_stats, {"bytes": 0.0, "seconds": 0.0}
        return stats

    # -- checkpoints (torch.distributed.checkpoint: sharded, resharded on load) -------------------
    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.scorer, self.optimizer)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.scorer, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        self.refresh()
