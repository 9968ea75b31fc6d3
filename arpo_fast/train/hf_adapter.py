"""Where the trainer reaches into Hugging Face transformers' Llama-family models (Llama, Qwen2,
Qwen3), in one place.

Checked against transformers 5.25.0 (the version ``constraints.txt`` pins). What the trainer relies
on, each piece probed by ``tests/test_hf_adapter.py``, which names the piece that a new version
changes:

- the decoder is ``model.model``, returning ``last_hidden_state``; its layers are
  ``model.model.layers``, and a layer's ``forward`` set on the instance is the one its decoder
  calls (activation checkpointing wraps it there);
- the LM head's weight is ``model.lm_head.weight``;
- the attention function is looked up by name, ``config._attn_implementation``, among those
  registered with ``AttentionInterface.register``; it is called as ``f(module, query, key, value,
  attention_mask, scaling=..., dropout=..., **kwargs)`` with query [1, H, T, D] and key/value
  [1, Hkv, T, D] (``module.layer_idx`` set), returns ([1, T, H, D], weights), receives keyword
  arguments of the decoder's forward it does not know, and gets a ``BlockMask`` passed as
  ``attention_mask`` untouched;
- sliding-window layers are named in ``config.layer_types``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Optional

import torch

CHECKED_TRANSFORMERS = ("5.25.0",)
"""The transformers versions this adapter was checked against."""


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def lm_head_weight(model) -> torch.Tensor:
    return model.lm_head.weight


def hidden_states(model, **inputs) -> torch.Tensor:
    """The decoder's last hidden states ([batch, T, hidden]) for ``inputs`` (forwarded as keyword
    arguments, extra ones down to the attention function), without a KV cache."""
    return model.model(use_cache=False, **inputs).last_hidden_state


def sliding_window_layers(model) -> bool:
    """Whether some layer of ``model`` attends to a sliding window only."""
    return "sliding_attention" in (getattr(model.config, "layer_types", None) or ())


@contextlib.contextmanager
def attention_function(model, name: str, function: Optional[Callable] = None):
    """Inside the block the model's layers call attention function ``name``: a transformers one,
    or ``function`` registered under ``name``."""
    if function is not None:
        from transformers import AttentionInterface

        AttentionInterface.register(name, function)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


@contextlib.contextmanager
def wrapped_layers(model, wrap: Callable[[Callable], Callable], enabled: bool = True):
    """Inside the block each decoder layer's ``forward`` is ``wrap(forward)``; module hooks (FSDP2's
    included) stay outside it."""
    layers = list(decoder_layers(model)) if enabled else []
    for layer in layers:
        layer.forward = wrap(layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
