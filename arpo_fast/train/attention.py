"""How the update runs the model's attention over packed rows, and activation checkpointing.

Hugging Face Llama-family models (Llama, Qwen2, Qwen3; transformers 5) call the attention function
named by ``config._attn_implementation``, hand it a ready 4-D ``attention_mask`` untouched (a
``BlockMask`` for ``flex_attention``) and pass extra keyword arguments of the model's forward down
to it; ``position_ids`` set the rotary positions. So a tree-packed row (``packing.TreeBatch``) runs
through the model's own forward, its attention as one of:

- ``flex_attention`` (CUDA): a block mask from the tree rule (key j visible to query i iff
  j <= i < subtree_end[j]); blocks outside every path are skipped, so attention costs what the
  paths cost, not T^2.
- ``sdpa`` (the CPU, tests): ``scaled_dot_product_attention`` once per path of the row, the path's
  keys gathered and an explicit boolean mask (causal, ending at the path's own queries): each row
  position is the query of exactly one path, and the cost is that of the paths too.
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
PATH_SDPA = "arpo_path_sdpa"  # the name the packed rows' sdpa is registered under with transformers


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
def attention_implementation(model, name: str, packed: bool):
    """The model's layers call attention function ``name`` (a resolved one) inside the block."""
    config = model.config
    before = config._attn_implementation
    if packed and name == "sdpa":
        from transformers import AttentionInterface

        AttentionInterface.register(PATH_SDPA, path_sdpa_attention)
        name = PATH_SDPA
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def path_masks(path_keys: torch.Tensor, path_sizes: list[tuple[int, int]]) -> list[tuple]:
    """Per path of a packed row (``packing.TreeBatch``): (keys: int64 [K] row positions, queries:
    int64 [q] the last q of them, mask: bool [q, K], True where a query attends)."""
    out = []
    for keys, (K, q) in zip(path_keys.split([k for k, _ in path_sizes]), path_sizes):
        depth = torch.arange(K, device=keys.device)
        out.append((keys, keys[K - q:], depth[None, :] <= depth[K - q:, None]))
    return out


def path_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        tree_paths=None, **kwargs):
    """Attention over a packed row, one ``scaled_dot_product_attention`` per path.

    ``query`` [1, H, T, D], ``key``/``value`` [1, Hkv, T, D]; ``tree_paths`` from
    :func:`path_masks`. Returns ([1, T, H, D], None) as transformers' attention functions do."""
    if tree_paths is None:
        raise ValueError("the packed update's sdpa attention needs tree_paths (from path_masks)")
    if key.shape[1] != query.shape[1]:  # grouped heads: with a mask, CUDA's fused kernels want them whole
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    outs, rows = [], []
    for keys, queries, mask in tree_paths:
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query.index_select(2, queries), key.index_select(2, keys), value.index_select(2, keys),
            attn_mask=mask, dropout_p=dropout, scale=scaling))
        rows.append(queries)
    order = torch.argsort(torch.cat(rows))  # every row position is one path's query exactly once
    return torch.cat(outs, dim=2).index_select(2, order).transpose(1, 2).contiguous(), None


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
