"""A paged-KV forward pass for Llama-family models that runs on the Hugging Face model's own modules.

Nothing is copied or converted: every projection, norm, embedding and the LM head is the live
``transformers`` module (or its parameter), so an optimizer step on the trained model is seen by the
next rollout forward. A model with ``peft`` LoRA adapters runs on its frozen base projections plus
the live adapters, which the engine applies itself (``lora.py``): no merged copy, nothing to refresh.
Rotary cos/sin come from the model's own rotary module, which covers the Llama-3 ``rope_scaling`` and
the other RoPE variants that ``transformers`` implements.

A step is ragged: the new tokens of all sequences are flattened to [N, hidden] (prefill chunks, tool
results and single-token decodes mixed), attention reads the paged cache, and logits are computed
only where they are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from arpo_fast.engine.kv_cache import PagedKVCache
from arpo_fast.engine.lora import check_adapters_applied, layer_projections
from arpo_fast.kernels import (
    paged_attention_decode,
    paged_attention_extend,
    rotary_kv_write,
)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class Batch:
    """Device tensors of one ragged step (N new tokens over B sequences).

    input_ids: int64 [N]; positions: int64 [N]; slot_mapping: int64 [N];
    block_tables: int32 [B, W]; context_lens: int32 [B] (after the step);
    cu_seqlens: int32 [B + 1]; logit_rows: int64 [R], the rows of [N] whose logits are returned;
    max_new: the largest per-sequence token count (a host int: 1 means a pure decode step).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens: torch.Tensor
    logit_rows: torch.Tensor
    max_new: int


class PagedModel:
    """Wraps a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` for paged steps,
    with or without ``peft`` LoRA adapters on its projections (a ``PeftModel`` is unwrapped). Build it
    after the adapters are added: the projections are resolved here, once."""

    def __init__(self, hf_model: torch.nn.Module):
        # transformers' modules are read by attribute name (torch types each as Tensor | Module)
        model: Any = hf_model
        if hasattr(model, "get_base_model"):  # a PeftModel: the transformers model inside it
            model = model.get_base_model()
        config: Any = getattr(model, "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model type {model_type!r}: the engine supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} causal LMs from transformers"
            )
        if not hasattr(model, "lm_head") or not hasattr(model, "model"):
            raise ValueError(
                f"expected a *ForCausalLM model with .model and .lm_head, got {type(model).__name__}"
            )
        self.hf: Any = model
        self.inner: Any = model.model
        self.layers: list[Any] = list(self.inner.layers)
        self._check_attention(config)
        self.projections = [layer_projections(layer, i) for i, layer in enumerate(self.layers)]
        check_adapters_applied(model, self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = int(
            getattr(attn, "head_dim", None)
            or getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads
        )
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.vocab_size: int = self.inner.embed_tokens.num_embeddings
        rotary = getattr(self.inner, "rotary_emb", None) or getattr(attn, "rotary_emb", None)
        if rotary is None:
            raise ValueError("the model has no rotary embedding module (model.model.rotary_emb)")
        self.rotary: torch.nn.Module = rotary
        rope_type = str(getattr(self.rotary, "rope_type", "default"))
        if "dynamic" in rope_type or rope_type == "longrope":
            # Their frequencies depend on the longest position in the forward's batch, so a token's
            # K/V would depend on which sequences shared its step.
            raise ValueError(
                f"rope type {rope_type!r} is not supported (batch-dependent frequencies); "
                "default, linear, llama3, yarn and other static types are"
            )

    def _check_attention(self, config) -> None:
        for i, layer in enumerate(self.layers):
            window = getattr(layer.self_attn, "sliding_window", None)
            if window is not None:
                raise ValueError(
                    f"layer {i} uses sliding-window attention (window {window}); the "
                    "engine implements full causal attention only"
                )
        if getattr(config, "num_key_value_heads", None) is None:
            raise ValueError("config.num_key_value_heads is missing")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    def _attention(self, i: int, x: torch.Tensor, cos, sin, cache: PagedKVCache, batch: Batch):
        """Self-attention of layer i on x [N, hidden]: rotates q/k and writes the new K/V in one
        kernel, then reads the paged cache."""
        attn, proj = self.layers[i].self_attn, self.projections[i]
        N = x.shape[0]
        q = proj.q(x).view(N, self.num_heads, self.head_dim)
        k = proj.k(x).view(N, self.num_kv_heads, self.head_dim)
        v = proj.v(x).view(N, self.num_kv_heads, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        kc, vc = cache.k(i), cache.v(i)
        q = rotary_kv_write(q, k, v, cos, sin, kc, vc, batch.slot_mapping)
        if batch.max_new == 1:
            o = paged_attention_decode(q, kc, vc, batch.block_tables, batch.context_lens, self.scale)
        else:
            o = paged_attention_extend(
                q, kc, vc, batch.block_tables, batch.context_lens, batch.cu_seqlens, batch.max_new, self.scale
            )
        return proj.o(o.reshape(N, self.num_heads * self.head_dim))

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP of layer i (Llama / Qwen2 / Qwen3: down(act(gate(x)) * up(x)))."""
        proj = self.projections[i]
        return proj.down(self.layers[i].mlp.act_fn(proj.gate(x)) * proj.up(x))

    @torch.no_grad()
    def forward(self, cache: PagedKVCache, batch: Batch) -> torch.Tensor:
        """Run one step; returns logits [R, vocab] at ``batch.logit_rows``, in the model's dtype (the
        sampler reads bf16 directly; an fp32 copy would only add a pass over [R, vocab])."""
        h = self.inner.embed_tokens(batch.input_ids)
        cos, sin = self.rotary(h, batch.positions[None])
        cos, sin = cos[0], sin[0]  # [N, head_dim]
        for i, layer in enumerate(self.layers):
            h = h + self._attention(i, layer.input_layernorm(h), cos, sin, cache, batch)
            h = h + self._mlp(i, layer.post_attention_layernorm(h))
        h = self.inner.norm(h.index_select(0, batch.logit_rows))
        return self.hf.lm_head(h)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        return PagedKVCache.bytes_per_block(
            self.num_layers, block_size, self.num_kv_heads, self.head_dim, dtype or self.dtype
        )
