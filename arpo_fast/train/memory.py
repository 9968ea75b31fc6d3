"""The per-GPU memory plan of a run, from the model's ``config.json`` alone (``--plan-memory``).

A step has two phases that never overlap in time, and the plan sizes each:

- **rollout**: the engine's weights (bf16, the full model on every rank), whatever of the trainer's
  state stays on the GPU (fp32 master shards and AdamW state, unless ``--offload-optimizer`` moves
  them to the CPU for the rollout), the decode workspace, and the KV pool, which gets what is left;
- **update**: the trainer state, the fp32 gradient shards, FSDP2's gathered layer and root
  parameters and their unsharded gradients, the LM-head workspace, and the activations of one
  micro-batch of ``--micro-batch-tokens`` tokens. The KV pool is released during the update, and
  so, under torchrun, is the engine's full bf16 copy of the weights (the update runs on the
  shards; the copy is written again from them once per step, before the next rollout). In one
  process the engine's weights are the trained model itself and stay.

With ``--lora-rank`` the base is frozen in bf16 (no gradients, no optimizer state) and only the
adapters (r (in + out) parameters per targeted projection and layer) have fp32 weights, gradients
and AdamW state; the KL reference is the base with the adapters switched off, no copy. Under
torchrun the rollout copy's base stays through the update (it never changes: a refresh moves the
adapters only), beside FSDP2's shards of it.

Every figure is a formula of the model's shape, named on its row. The activation bytes per token
and layer were counted on transformers' Qwen2/Llama/Qwen3 decoder layers (5.x) with autograd's
saved-tensor hooks (``tests/test_memory.py`` recounts them on models of other shapes): in a 2-byte
compute dtype, 16 H + 4 Q + 4 KV + 8 I + 4 heads + 8 bytes a token (H hidden, Q = heads x
head_dim, KV = kv_heads x head_dim, I the MLP width; RMSNorm works in fp32, hence 16 H), and about
10 H outside the layers (embedding, final norm, the LM head's input). With activation
checkpointing a layer keeps only its 2 H-byte input, and one layer at a time is recomputed.
Allocator fragmentation and the CUDA context are a fixed share (``headroom``) and a constant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = float(1 << 30)
# Linear layers LoRA adapts by default: every projection of attention and the MLP.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder (Llama, Qwen2, Qwen3) that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config object or its ``config.json`` as a dict."""
        get: Callable[..., Any] = (
            config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        )
        kind = get("model_type", "")
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        return cls(
            vocab=get("vocab_size"),
            hidden=hidden,
            layers=get("num_hidden_layers"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            intermediate=get("intermediate_size"),
            tied=bool(get("tie_word_embeddings", False)),
            qkv_bias=bool(get("attention_bias", False)) or kind == "qwen2",
            qk_norm=kind == "qwen3",
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelShape:
        path = Path(folder) / "config.json"
        try:
            return cls.from_config(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"--model {folder}: cannot read a model shape from {path} ({exc})") from exc

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        n = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden  # two RMSNorms
        if self.qkv_bias:
            n += self.q_width + 2 * self.kv_width
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def root_params(self) -> int:
        """Embedding, final norm and (untied) LM head: what FSDP2's root module holds."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        """Parameters of rank-``rank`` adapters (A: r x in, B: out x r) on ``targets`` of every layer."""
        shapes = self.linear_shapes()
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    def lora_activation_bytes(self, rank: int, targets: tuple[str, ...], mask_bytes: int = 0) -> int:
        """Bytes LoRA adds to what autograd saves per token in one layer: ``peft`` casts each
        target's input to fp32 for its adapter, and A's and B's matmuls save their fp32 inputs
        (4 B x in, 4 B x r). With dropout its mask adds ``mask_bytes`` B x in: 1 on CUDA (a bool
        mask), 4 on the CPU (a float one)."""
        shapes = self.linear_shapes()
        return sum((4 + mask_bytes) * shapes[t][0] + 4 * rank for t in targets)

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return 2 * self.layers * self.kv_width * itemsize

    def layer_activation_bytes(self) -> int:
        """Bytes autograd saves per token in one decoder layer, computing in bf16 (see the module's
        docstring); Qwen3's per-head q/k norms, in fp32, add 6 (Q + KV) + 4 (heads + kv_heads)."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        n = 16 * h + 4 * q + 4 * kv + 8 * i + 4 * self.heads + 8
        if self.qk_norm:
            n += 6 * (q + kv) + 4 * (self.heads + self.kv_heads)
        return n


@dataclass(frozen=True)
class PlanSettings:
    """What besides the model decides the plan."""

    world: int = 1
    """GPUs (ranks) the run uses."""
    replicas: int = 1
    """HSDP replicas (``--hsdp-replicas``): the trained state is sharded over world / replicas ranks."""
    gpu_gib: float = 80.0
    """Memory of one GPU in GiB (an "80 GB" H100 has 79.6 GiB, a "141 GB" H200 140.4)."""
    micro_batch_tokens: int = 16384
    checkpointing: bool = True
    rollout_sequences: int = 256
    """Sequences one rank decodes at once (prompts per rank x trajectories per prompt)."""
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: bool = False
    """``--lora-dropout`` > 0: the update's forwards keep each adapter's dropout mask."""
    offload_optimizer: bool = False
    kl_penalty: bool = False
    """``--kl-coef`` > 0: the update also runs the KL reference policy."""
    context_gib: float = 0.75
    """The CUDA context and libraries (cuBLAS workspaces): not in torch's allocator."""
    headroom: float = 0.05
    """Share of the GPU kept free for allocator fragmentation."""


@dataclass
class MemoryPlan:
    """Rows of (what, rollout GiB, update GiB, how it is counted) and what is left in each phase."""

    shape: ModelShape
    settings: PlanSettings
    rows: list[tuple[str, float, float, str]] = field(default_factory=list)

    def add(self, what: str, rollout: float, update: float, how: str) -> None:
        self.rows.append((what, rollout / GIB, update / GIB, how))

    @property
    def usable_gib(self) -> float:
        s = self.settings
        return s.gpu_gib * (1 - s.headroom) - s.context_gib

    def used(self, phase: int) -> float:
        return sum((row[1], row[2])[phase] for row in self.rows)

    @property
    def kv_pool_gib(self) -> float:
        """What the rollout leaves for the KV pool."""
        return self.usable_gib - self.used(0)

    @property
    def update_free_gib(self) -> float:
        """What the update leaves unused (negative: it does not fit)."""
        return self.usable_gib - self.used(1)

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv_pool_gib * GIB // self.shape.kv_bytes_per_token()))

    @property
    def fits(self) -> bool:
        return self.kv_pool_gib > 0 and self.update_free_gib >= 0


def plan_memory(shape: ModelShape, s: PlanSettings) -> MemoryPlan:
    """The plan of one GPU of a run with these settings (bf16 weights and compute)."""
    p, w, plan = shape.params, s.world, MemoryPlan(shape, s)
    lora = s.lora_rank > 0
    trained = shape.lora_params(s.lora_rank, s.lora_targets) if lora else p
    n = w // max(1, s.replicas)  # the ranks one copy of the trainer's state is sharded over
    shard = trained / n
    if lora:
        _lora_weights(plan, trained, n)
    elif w > 1:
        plan.add("engine's weights, bf16", 2 * p, 0, "2 B x P on every rank; released in the update")
    else:
        plan.add("model weights, bf16", 2 * p, 2 * p, "2 B x P, the engine's and the update's")
    if not lora:
        where = "per rank: 4 B x P / shards" if w > 1 else "4 B x P"
        plan.add("fp32 master weights", 0 if s.offload_optimizer else 4 * shard, 4 * shard, where)
    plan.add(
        "AdamW state, fp32", 0 if s.offload_optimizer else 8 * shard, 8 * shard, "8 B x trained / shards"
    )
    plan.add("gradients, fp32", 0, 4 * shard, "4 B x trained / shards; freed after the step")
    if s.kl_penalty:
        ref = 0 if lora else 2 * p / n
        what, how = (
            ("KL reference", "the base, adapters off: no copy")
            if lora
            else ("KL reference model, bf16", "2 B x P / shards")
        )
        plan.add(what, ref, ref, how)
    if w > 1:
        gathered: float = 2 * (2 * shape.layer_params) + 2 * shape.root_params
        gathered += 2 * 4 * trained / shape.layers if lora else 0
        plan.add("FSDP2 gathered parameters", 0, gathered, "bf16: two layers (prefetch) and the root")
        unsharded = 4 * trained / shape.layers if lora else 4 * (shape.layer_params + shape.root_params)
        plan.add("unsharded gradients", 0, unsharded, "fp32 before reduce-scatter: a layer and the root")
    _activations(plan)
    return plan


def _lora_weights(plan: MemoryPlan, adapters: int, n: int) -> None:
    """A LoRA run's weights: the frozen base (bf16, no gradients, no optimizer state), and the
    adapters, trained in fp32 (one process: the engine runs on them; under torchrun the rollout
    copy has them whole, the base too through the update, and FSDP2 holds both sharded)."""
    p, w = plan.shape.params, plan.settings.world
    plan.add("frozen base weights, bf16", 2 * p, 2 * p, "2 B x P; no gradients, no optimizer state")
    if w > 1:
        plan.add("frozen base shards, bf16", 2 * p / n, 2 * p / n, "2 B x P / shards (FSDP2's)")
    both = 4 * adapters + (4 * adapters / n if w > 1 else 0)
    how = f"4 B x {_count(adapters)}: r (in + out) a target and layer" + (", + shards" if w > 1 else "")
    plan.add("LoRA adapters, fp32", both, both, how)


def _activations(plan: MemoryPlan) -> None:
    shape, s = plan.shape, plan.settings
    t = s.micro_batch_tokens
    per_layer = shape.layer_activation_bytes()
    if s.lora_rank:
        mask = 1 if s.lora_dropout else 0  # CUDA's dropout keeps a bool mask
        per_layer += shape.lora_activation_bytes(s.lora_rank, s.lora_targets, mask)
    if s.checkpointing:
        acts = t * (shape.layers * 2 * shape.hidden + per_layer)
        how = f"{t} tokens x (L x 2H + one layer recomputed)"
    else:
        acts = t * shape.layers * per_layer
        how = f"{t} tokens x L x {per_layer} B"
    plan.add("activations", 0, acts + t * 10 * shape.hidden, how + " + 10H outside the layers")
    head = 2 * (256 << 20) + t * shape.hidden * 4
    plan.add("LM-head workspace", 0, head, "two 256 MiB logits blocks + fp32 hidden gradient")
    plan.add(
        "decode workspace", s.rollout_sequences * shape.vocab * 6, 0, "logits of every sequence, bf16 + fp32"
    )


def format_plan(plan: MemoryPlan) -> str:
    """The plan as the markdown table ``--plan-memory`` prints."""
    s, shape = plan.settings, plan.shape
    mode = f"LoRA rank {s.lora_rank}" if s.lora_rank else "full weights"
    lines = [
        f"memory plan per GPU: {_count(shape.params)} parameters, {mode}, {s.world} GPU(s) of "
        f"{s.gpu_gib:g} GiB{_sharding(s)}, micro-batches of {s.micro_batch_tokens} tokens, "
        "activation checkpointing "
        f"{'on' if s.checkpointing else 'off'}"
        + (", optimizer offloaded during the rollout" if s.offload_optimizer else ""),
        "",
        "| what | rollout GiB | update GiB | counted as |",
        "|---|---|---|---|",
    ]
    for what, rollout, update, how in plan.rows:
        lines.append(f"| {what} | {rollout:.1f} | {update:.1f} | {how} |")
    lines.append(
        f"| CUDA context + {s.headroom:.0%} headroom | {s.gpu_gib - plan.usable_gib:.1f} | "
        f"{s.gpu_gib - plan.usable_gib:.1f} | fixed |"
    )
    kv_share = max(plan.kv_pool_gib, 0.0)
    lines.append(
        f"| **KV pool** | **{kv_share:.1f}** | released | {plan.kv_tokens:,} tokens at "
        f"{shape.kv_bytes_per_token() / 1024:g} KiB a token |"
    )
    lines.append(f"| **free** | 0.0 | **{plan.update_free_gib:.1f}** | |")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += [
        "",
        f"{verdict}: KV pool {plan.kv_pool_gib:.1f} GiB during the rollout, "
        f"{plan.update_free_gib:.1f} GiB spare during the update",
    ]
    return "\n".join(lines)


def _sharding(s: PlanSettings) -> str:
    if s.world == 1:
        return ""
    if s.replicas > 1:
        return f" (HSDP: {s.replicas} replicas sharded over {s.world // s.replicas})"
    return f" (sharded over {s.world})"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
