"""How the update runs the model's attention over packed rows, and activation checkpointing.

Hugging Face Llama-family models (Llama, Qwen2, Qwen3; transformers 5) take a ready 4-D mask as
``attention_mask`` and hand it to the attention function named by ``config._attn_implementation``
untouched: a ``BlockMask`` for ``flex_attention``, a boolean [1, 1, T, T] tensor for ``sdpa``;
``position_ids`` set the rotary positions. So a tree-packed row (``packing.TreeBatch``) runs through
the model's own forward with:

- ``flex_attention`` (CUDA): a block mask from the tree rule (key j visible to query i iff
  j <= i < subtree_end[j]); blocks outside every path are skipped, so attention costs what the
  paths cost, not T^2.
- ``sdpa`` (the CPU, tests): the same rule as an explicit boolean mask.
- ``flash_attention_2``: flash-attn's varlen kernels, for rows of independent sequences only (the
  per-trajectory update without padding); a tree's mask is not a set of causal sequences.

``--attn-implementation auto`` picks flex_attention on CUDA and sdpa on the CPU for the packed
update, flash_attention_2 (when flash-attn is installed, else sdpa) for the per-trajectory one.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch.utils.checkpoint import checkpoint

IMPLEMENTATIONS = ("auto", "sdpa", "flex_attention", "flash_attention_2")


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(name: str, packed: bool, device: torch.device) -> str:
    """The attention implementation ``name`` (one of ``IMPLEMENTATIONS``) stands for on ``device``."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if packed:
            return "flex_attention" if cuda else "sdpa"
        return "flash_attention_2" if cuda and flash_attn_installed() else "sdpa"
    if name == "flash_attention_2":
        if packed:
            raise ValueError("attn_implementation flash_attention_2 runs independent sequences only and "
                             "cannot express a tree's mask: use flex_attention or sdpa, or "
                             "--packed-update false")
        if not (cuda and flash_attn_installed()):
            raise ValueError("attn_implementation flash_attention_2 needs CUDA and the flash-attn package")
    return name


def check_model(model, packed: bool) -> None:
    """A packed update needs every layer to attend to the whole path (no sliding window)."""
    if packed and "sliding_attention" in (getattr(model.config, "layer_types", None) or ()):
        raise ValueError("the model has sliding-window attention layers, which the tree-packed update "
                         "does not mask; use --packed-update false")


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """The model's layers call attention function ``name`` inside the block."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def tree_mask(subtree_end: torch.Tensor, implementation: str):
    """The attention mask of a packed row: ``subtree_end`` int64 [T] (``packing.TreeBatch``).

    Returns a ``BlockMask`` for flex_attention, else a bool [1, 1, T, T] (True: attend)."""
    T = subtree_end.numel()
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def visible(b, h, q, kv):
            return (kv <= q) & (q < subtree_end[kv])

        return create_block_mask(visible, 1, None, T, T, device=subtree_end.device,
                                 _compile=subtree_end.is_cuda)
    i = torch.arange(T, device=subtree_end.device)
    return ((i[None, :] <= i[:, None]) & (i[:, None] < subtree_end[None, :]))[None, None]


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool):
    """Inside the block each decoder layer keeps only its input for backward and recomputes the
    rest there (non-reentrant ``torch.utils.checkpoint``), in eval mode too (Hugging Face's own
    switch only acts in training mode, and the update runs the model in eval mode: no dropout).
    Module hooks, FSDP2's included, stay outside the checkpoint."""
    layers = list(model.model.layers) if enabled else []
    for layer in layers:
        layer.forward = _checkpointed(layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to recompute for
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def resolve_checkpointing(name: str, device: torch.device) -> bool:
    """``auto``: on for CUDA (as in the reference's scripts), off on the CPU."""
    if name not in ("auto", "true", "false"):
        raise ValueError(f"gradient_checkpointing must be auto, true or false, got {name!r}")
    return torch.device(device).type == "cuda" if name == "auto" else name == "true"
