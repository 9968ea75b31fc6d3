"""The policy as FSDP2 trains it under ``torchrun`` (``distributed.py`` sets up the ranks).

:func:`shard` makes an FSDP2-sharded copy of the policy (per decoder layer and the root, fp32
masters, compute in the rollout dtype, gradients summed over ranks at the source);
:class:`ShardedPolicy` holds it with AdamW over the shards, beside the full rollout copy that each
rank's engine runs on, and refreshes that copy from the shards once a step (``sync_rollout``).
With LoRA the base stays frozen and only the adapters are trained and refreshed.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, cast

import torch

from arpo_fast.train.batch import LogprobModel
from arpo_fast.train.distributed import Dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def shard(model: torch.nn.Module, d: Dist, dtype: torch.dtype, lora=None) -> LogprobModel:
    """A copy of ``model`` wrapped for the update (``batch.LogprobModel``) and sharded with FSDP2:
    its trained parameters in ``dtype`` (fp32 masters for the trained policy, the model's own dtype
    for a frozen reference), computing in ``model``'s dtype, gradients reduced in fp32. Rank 0's
    values are the ones every rank gets.

    ``lora``: the ``lora.LoraSettings`` of a LoRA ``model``: the copy gets the same adapters (fp32,
    trained) and keeps its frozen base in ``model``'s dtype, both in each layer's FSDP unit (torch
    2.13's ``fully_shard`` gathers mixed dtypes as bytes, and asks one dtype of the trained
    parameters only, the only ones with gradients), computing in their own dtypes as ``peft`` does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor

    from arpo_fast.train.hf_adapter import decoder_layers

    compute = next(model.parameters()).dtype
    policy, scorer = _meta_copy(model, lora)
    for param in policy.parameters():  # buffers (rotary frequencies) keep their own dtype
        param.data = param.data.to(dtype if param.requires_grad else compute)
    cast_params = compute != dtype and lora is None
    mp = MixedPrecisionPolicy(param_dtype=compute if cast_params else None, reduce_dtype=torch.float32)
    for layer in decoder_layers(policy):
        _sum_gradients(fully_shard(layer, mesh=d.mesh, mp_policy=mp))
    _sum_gradients(fully_shard(scorer, mesh=d.mesh, mp_policy=mp))
    scorer.to_empty(device=d.device)
    full = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in policy.named_parameters():  # src_data_rank=0: rank 0's values everywhere
            part = cast("DTensor", param)  # fully_shard made each parameter a DTensor
            value = full[name].detach().to(part.dtype)
            part.copy_(distribute_tensor(value, part.device_mesh, part.placements))
        buffers = dict(model.named_buffers())
        for name, buf in policy.named_buffers():  # rotary frequencies: rebuilt, not sharded
            buf.copy_(buffers[name])
    return scorer


def _meta_copy(model: torch.nn.Module, lora) -> tuple[torch.nn.Module, LogprobModel]:
    """(policy, scorer): ``model``'s architecture on the meta device (with ``lora``'s adapters), and
    the module the update calls (``lora_run.AdapterPolicy`` for LoRA, else ``LogprobModel``)."""
    with torch.device("meta"):
        policy = type(model)(model.config).train(model.training)
        if lora is None:
            return policy, LogprobModel(policy)
        from arpo_fast.train.lora import add_lora
        from arpo_fast.train.lora_run import AdapterPolicy

        add_lora(policy, lora)  # the adapters made here are meta too: their values come from model's
        return policy, AdapterPolicy(policy)


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
    trainer uses ``optim.MasterWeights``. The rollout copy is refreshed by :meth:`sync_rollout`,
    once a step before the next rollout: the mini-batches' optimizer steps in between change only
    the shards (at 7B each refresh gathers ~15 GB).

    ``lora``: the ``lora.LoraSettings`` of a LoRA policy: AdamW steps the adapters only, and a
    refresh gathers the adapters only (the engine applies them live on the frozen base). The rollout
    copy's base never changes: it stays through the update, where it is the KL reference."""

    def __init__(self, rollout_model: torch.nn.Module, d: Dist, *, lr: float, weight_decay: float, lora=None):
        self.rollout_model, self.dist, self.lora = rollout_model, d, lora
        self.scorer = shard(rollout_model, d, torch.float32, lora)
        self.policy = self.scorer.policy
        trained = [p for p in self.scorer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
        full = dict(rollout_model.named_parameters())
        self._all = [(s, full[name]) for name, s in self.policy.named_parameters()]
        self._pairs = [(s, t) for s, t in self._all if s.requires_grad]  # what a step changes
        self._copy_bytes = [t.untyped_storage().nbytes() for _, t in self._pairs]
        self.refresh_stats = self._no_refresh()
        self.stale = False  # an optimizer step since the last refresh
        self.refresh(self._all)  # the copy as rank 0 has it, frozen parameters included
        self.take_refresh_stats()  # the setup's refresh is no step's

    def clip_and_step(self, max_norm: float) -> float:
        """Clip the global gradient norm and step AdamW on the shards (the rollout copy waits for
        :meth:`sync_rollout`); returns the norm before clipping. A non-finite norm skips the step
        on every rank."""
        params = [p for p in self.scorer.parameters() if p.grad is not None]
        total = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)  # a DTensor
        if not math.isfinite(norm):
            return norm
        self.optimizer.step()
        self.stale = True
        return norm

    def sync_rollout(self) -> dict:
        """Bring the rollout copy up to date (:meth:`catch_up_rollout_copy`); returns the metrics of
        the refreshes since the last call (MB received per rank, seconds, how many)."""
        self.catch_up_rollout_copy()
        moved = self.take_refresh_stats()
        return {
            "weight_refresh_mb": round(moved["bytes"] / 2**20, 3),
            "weight_refresh_s": round(moved["seconds"], 4),
            "weight_refreshes": moved["count"],
        }

    def catch_up_rollout_copy(self) -> None:
        """Refresh the rollout copy if an optimizer step changed the shards since the last refresh
        or the update freed it: the one entry point of a step's refresh (the step's metrics and the
        residency's phases call it; the refreshes are counted for :meth:`sync_rollout`)."""
        if self.stale or self.rollout_copy_released:
            self.refresh()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def refresh(self, pairs=None) -> None:
        """Gather the trained shards (or ``pairs``' shards) in the rollout dtype and copy them into
        the rollout copy, in place."""
        start = time.perf_counter()
        moved = 0
        for (_, target), nbytes in zip(self._pairs, self._copy_bytes):  # a released copy comes back
            if target.untyped_storage().nbytes() == 0:
                target.untyped_storage().resize_(nbytes)
        for shard, target in self._pairs if pairs is None else pairs:  # each shard is a DTensor
            whole = cast("DTensor", shard.detach().to(target.dtype)).full_tensor()
            target.copy_(whole)
            moved += whole.numel() * whole.element_size()
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        self.refresh_stats["bytes"] += moved * (self.dist.world - 1) / self.dist.world
        self.refresh_stats["seconds"] += time.perf_counter() - start
        self.refresh_stats["count"] += 1
        self.stale = False

    @property
    def rollout_copy_released(self) -> bool:
        return any(t.untyped_storage().nbytes() == 0 for _, t in self._pairs)

    def release_rollout_copy(self) -> None:
        """Free the rollout copy's trained parameters' storage (the update does not read it;
        a LoRA run's frozen base stays); the next
        :meth:`refresh` allocates and fills it again, at new addresses (the engine's captured
        graphs are then captured again: ``Engine.reacquire``)."""
        for _, target in self._pairs:  # weights read from a file's memory map stay: not resizable
            if target.untyped_storage().resizable():
                target.untyped_storage().resize_(0)

    def take_refresh_stats(self) -> dict:
        """Bytes each rank received, seconds spent and refreshes done since the last call."""
        stats, self.refresh_stats = self.refresh_stats, self._no_refresh()
        return stats

    @staticmethod
    def _no_refresh() -> dict:
        return {"bytes": 0.0, "seconds": 0.0, "count": 0}

    # -- checkpoints (torch.distributed.checkpoint: sharded, resharded on load) -------------------
    def _options(self):
        # A LoRA run's trainer state is its adapters and their AdamW state (base/ or --model has the
        # base); DCP's load stays strict about the keys kept, strict=False only lets the base's go.
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.lora is not None, strict=self.lora is None)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.scorer, self.optimizer, options=self._options())
        if self.lora is not None:  # a tied LM head is frozen too, but DCP keeps it under its own name
            trained = {n for n, p in self.scorer.named_parameters() if p.requires_grad}
            model = {k: v for k, v in model.items() if k in trained}
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model, optim = state["model"], state["optim"]
        set_state_dict(
            self.scorer,
            self.optimizer,
            model_state_dict=model,
            optim_state_dict=optim,
            options=self._options(),
        )
        self.refresh()
        self.take_refresh_stats()
