"""The engine's linear projections, LoRA adapters included, applied by the engine itself.

A layer adapted by ``peft`` holds a ``lora.Linear`` in place of each adapted projection: the frozen
projection (its ``base_layer``), the adapter's A [r, in] and B [out, r] (fp32 masters while the base
is bf16) and a scale (alpha / r). The engine does not call PEFT's forward; it reads those tensors and
computes ``base(x) + scale * (x A^T) B^T`` itself, with PEFT's arithmetic (the adapter in its own
dtype, added to the base output, rounded once to the base dtype), so that:

- the rollout samples from the policy without dropout whatever the module's training mode;
- a step is one fixed sequence of kernels over the live tensors, which CUDA graphs capture and
  replay: an optimizer step on A and B (in place) is seen by the next engine step, with no merged
  copy to build and nothing to refresh;
- an adapter the engine cannot apply exactly (DoRA and PEFT's other variants, merged weights,
  several active adapters, an adapter on the embedding or the LM head) is an error when the engine
  is built, never silently left out.

The engine always applies the active adapter, also while the trainer has switched adapters off for
its KL reference forward (``arpo_fast.train.lora.adapters_disabled``): the rollout is the policy's.

``peft`` is never imported here: a LoRA layer is recognised by its attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol, TypeGuard

import torch
import torch.nn.functional as F

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
"""Every linear layer of a Llama / Qwen2 / Qwen3 decoder layer: what LoRA may adapt here."""


class LoraLinear:
    """``base(x) + scale * (x A^T) B^T`` (+ scale * B's bias when the adapter has one).

    base: the frozen ``nn.Linear``; a: [r, in], b: [out, r] (``nn.Parameter``, read at every call, so
    in-place updates are seen); x: [N, in] in the base's dtype; returns [N, out] in that dtype."""

    __slots__ = ("base", "a", "b", "b_bias", "scale")

    def __init__(self, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, b_bias, scale: float):
        self.base, self.a, self.b, self.b_bias, self.scale = base, a, b, b_bias, float(scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = F.linear(F.linear(x.to(self.a.dtype), self.a), self.b, self.b_bias)
        return (y + delta * self.scale).to(y.dtype)


Projection = Callable[[torch.Tensor], torch.Tensor]
"""A projection as the engine calls it: a plain ``nn.Linear`` or a :class:`LoraLinear`."""


class LayerProjections(NamedTuple):
    """One decoder layer's projections as the engine calls them."""

    q: Projection
    k: Projection
    v: Projection
    o: Projection
    gate: Projection
    up: Projection
    down: Projection


class LoraLayer(Protocol):
    """What this project reads of a PEFT LoRA layer (``peft.tuners.lora.LoraLayer``), by adapter
    name. Spelled out here: torch types every module attribute as ``Tensor | Module``."""

    lora_A: Mapping[str, torch.nn.Linear]
    lora_B: Mapping[str, torch.nn.Linear]
    lora_dropout: Mapping[str, torch.nn.Module]
    scaling: Mapping[str, float]
    active_adapters: list[str]
    disable_adapters: bool

    def enable_adapters(self, enabled: bool) -> None: ...

    def get_base_layer(self) -> torch.nn.Linear: ...

    def train(self, mode: bool = True) -> torch.nn.Module: ...


def is_lora_layer(module: torch.nn.Module) -> TypeGuard[LoraLayer]:
    """Whether ``module`` is a PEFT LoRA layer (it wraps a ``base_layer`` and holds ``lora_A``)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def projection(module: torch.nn.Module, where: str) -> Projection:
    """The callable the engine runs for the projection ``module`` (named ``where`` in messages):
    the module itself, or a :class:`LoraLinear` over a PEFT LoRA layer's live tensors."""
    if not is_lora_layer(module):
        return module
    if getattr(module, "merged", False):
        raise ValueError(
            f"{where}: the LoRA adapter is merged into the base weights; unmerge it "
            "(the engine applies adapters itself, so a merged one would count twice)"
        )
    names = [n for n in module.active_adapters if n in module.lora_A]
    base = module.get_base_layer()
    if not names:
        return base
    if len(names) > 1:
        raise ValueError(f"{where}: {len(names)} active LoRA adapters {names}; the engine applies one")
    name = names[0]
    variants = getattr(module, "lora_variant", {})
    if name in variants or getattr(module, "use_dora", {}).get(name):
        kind = type(variants[name]).__name__ if name in variants else "DoRA"
        raise ValueError(f"{where}: LoRA variant {kind} is not supported by the engine (plain LoRA is)")
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError(f"{where}: fan_in_fan_out LoRA layers (GPT-2's Conv1D) are not supported")
    b = module.lora_B[name]
    return LoraLinear(base, module.lora_A[name].weight, b.weight, b.bias, module.scaling[name])


def layer_projections(layer: torch.nn.Module, index: int) -> LayerProjections:
    """The seven projections of decoder layer ``index`` (attention, then MLP)."""
    attn, mlp = layer.self_attn, layer.mlp
    found = [
        projection(getattr(owner, name), f"layer {index} {name}")
        for owner, names in ((attn, ATTENTION_PROJECTIONS), (mlp, MLP_PROJECTIONS))
        for name in names
    ]
    return LayerProjections(*found)


def check_adapters_applied(model: torch.nn.Module, layers) -> None:
    """Raise if ``model`` holds a LoRA layer that is not one of the decoder layers' projections
    (an adapter on the embedding or the LM head, say): the engine would not apply it."""
    applied = {
        id(getattr(owner, name))
        for layer in layers
        for owner, names in ((layer.self_attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS))
        for name in names
    }
    for name, module in model.named_modules():
        if is_lora_layer(module) and id(module) not in applied:
            raise ValueError(
                f"LoRA adapter on {name}: the engine applies adapters on the decoder layers' "
                f"projections only ({', '.join(PROJECTIONS)})"
            )
