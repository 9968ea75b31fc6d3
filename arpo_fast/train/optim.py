"""fp32 master weights for a model kept in bf16/fp16, around any torch optimizer (AdamW here).

At the reference's learning rate (1e-6) an update is far below bf16's resolution (a weight of 0.02
moves by about 1e-6, bf16 resolves 1e-4 there), so AdamW applied to bf16 weights directly leaves
them unchanged. :class:`MasterWeights` keeps an fp32 copy of each low-precision parameter, steps that
copy and writes it back into the model's own tensors (in place, so the rollout engine and any
captured CUDA graph see the new weights). fp32 parameters are stepped directly, without a copy.
Gradients are summed in fp32: a hook on each low-precision parameter moves its gradient into the
master's fp32 ``.grad`` as soon as backward has produced it, so micro-batches add up in fp32 (a bf16
``.grad`` summed over 256 micro-batches drifts by ~2%). Gradient clipping is computed on the fp32
gradients.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class StepsPolicy(Protocol):
    """What the update steps once per mini-batch: :class:`MasterWeights` in one process,
    ``sharded_policy.ShardedPolicy`` under torchrun."""

    def clip_and_step(self, max_norm: float) -> float: ...

    def zero_grad(self) -> None: ...


class MasterWeights:
    """An optimizer made by ``make_optimizer(fp32 parameters)`` (default AdamW) stepping fp32
    masters of ``params``. Call :meth:`clip_and_step` after ``backward``, then :meth:`zero_grad`;
    ``state_dict`` holds the masters too."""

    def __init__(self, params, make_optimizer=None, *, lr: float = 1e-6, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.master = [
            p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_()
            for p in self.params
        ]
        self.copied = [i for i, (p, m) in enumerate(zip(self.params, self.master)) if m is not p]
        self._hooks = [
            self.params[i].register_post_accumulate_grad_hook(lambda p, m=self.master[i]: _move_grad(p, m))
            for i in self.copied
        ]
        if make_optimizer is None:
            self.inner = torch.optim.AdamW(self.master, lr=lr, weight_decay=weight_decay)
        else:
            self.inner = make_optimizer(self.master)

    def _copies(self):
        return [(self.params[i], self.master[i]) for i in self.copied]

    def clip_and_step(self, max_norm: float) -> float:
        """Clip the gradients' global norm to ``max_norm`` (0: no clipping) and step; returns the
        norm before clipping. A non-finite norm skips the step and changes no weight."""
        for p, m in self._copies():  # gradients set by hand, not by backward
            _move_grad(p, m)
        grads = [m for m in self.master if m.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))
        if not math.isfinite(norm):
            return norm
        self.inner.step()
        with torch.no_grad():
            for p, m in self._copies():
                p.copy_(m)
        return norm

    def remove_hooks(self) -> None:
        """Stop moving the model's gradients into the masters (before training it otherwise)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.master:
            m.grad = None

    def state_dict(self) -> dict:
        return {
            "optimizer": self.inner.state_dict(),
            "master": {i: self.master[i].detach().clone() for i in self.copied},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the optimizer's state and the fp32 masters (and from them the model's weights)."""
        masters = state.get("master", {})
        expected = set(self.copied)
        if set(masters) != expected:
            raise ValueError(
                f"optimizer state has fp32 masters for {len(masters)} parameters, this "
                f"model needs them for {len(expected)} (was it saved in another dtype?)"
            )
        self.inner.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for i, saved in masters.items():
                self.master[i].copy_(saved)
                self.params[i].copy_(saved)


def _move_grad(param: torch.Tensor, master: torch.Tensor) -> None:
    """Add ``param``'s low-precision gradient to ``master``'s fp32 one, and free it."""
    if param.grad is None:
        return
    grad = param.grad.float()
    master.grad = grad if master.grad is None else master.grad.add_(grad)
    param.grad = None
