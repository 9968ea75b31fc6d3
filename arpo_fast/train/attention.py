"""How the update runs the model's attention over packed rows, and activation checkpointing.

Hugging Face Llama-family models (Llama, Qwen2, Qwen3; transformers 5) call the attention function
named by ``config._attn_implementation``, hand it a ready 4-D ``attention_mask`` untouched (a
``BlockMask`` for ``flex_attention``) and pass extra keyword arguments of the model's forward down
to it; ``position_ids`` set the rotary positions. So a tree-packed row (``packing.TreeBatch``) runs
through the model's own forward, its attention as one of:

- ``flex_attention`` (CUDA): a block mask from the tree rule (key j visible to query i iff
  j <= i < subtree_end[j]); blocks outside every path are skipped, so attention costs what the
  paths cost, not T^2. The block mask is worked out from per-block bounds of ``subtree_end``
  (no T x T mask, nothing compiled), and ``flex_attention`` is compiled with dynamic shapes: one
  graph serves rows of every length (a second one rows of a single block), so a new micro-batch
  length does not compile it again.
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
TREE_FLEX = "arpo_tree_flex"  # and their flex_attention
FLEX_BLOCK = 128  # flex_attention's default block size (queries and keys)
# Devices whose flex_attention is compiled, and the torch.compile backend. The CPU runs it eagerly
# (forward only: torch has no CPU flex backward), which is what the tests use.
FLEX_COMPILE = {"cuda": "inductor"}
_compiled_flex: dict = {}


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
    if packed and name in ("sdpa", "flex_attention"):
        from transformers import AttentionInterface

        own = {"sdpa": (PATH_SDPA, path_sdpa_attention), "flex_attention": (TREE_FLEX, tree_flex_attention)}
        name, function = own[name]
        AttentionInterface.register(name, function)
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

    Returns a ``BlockMask`` for flex_attention (:func:`tree_block_mask`), else a bool [1, 1, T, T]
    (True: attend)."""
    if implementation == "flex_attention":
        return tree_block_mask(subtree_end)
    i = torch.arange(subtree_end.numel(), device=subtree_end.device)
    return ((i[None, :] <= i[:, None]) & (i[:, None] < subtree_end[None, :]))[None, None]


def tree_block_mask(subtree_end: torch.Tensor, block: int = FLEX_BLOCK):
    """flex_attention's ``BlockMask`` of the tree rule, the same one ``create_block_mask`` finds by
    evaluating every (query, key) pair, here from each key block's largest and smallest subtree end.

    Key j is seen by the queries j..subtree_end[j] - 1. So a key block before query block [a, b)
    has some visible pair iff a key of it ends its subtree after a (its largest end > a), and all
    pairs visible iff every key's subtree reaches b (its smallest end >= b); the diagonal block
    always has some (each token sees itself) and is never whole (causal); later blocks have none.
    A block that the row's end cuts short counts as partly visible, as ``create_block_mask`` pads
    the mask with False."""
    from torch.nn.attention.flex_attention import BlockMask

    T, device = subtree_end.numel(), subtree_end.device
    n = -(-T // block)
    pad = n * block - T
    ends = torch.nn.functional.pad(subtree_end, (0, pad), value=0).view(n, block)
    largest = ends.amax(1)
    smallest = torch.nn.functional.pad(subtree_end, (0, pad), value=T).view(n, block).amin(1)
    blocks = torch.arange(n, device=device)
    q_start, q_end = blocks * block, (blocks + 1) * block
    before = blocks[None, :] < blocks[:, None]  # [query block, key block]
    full = before & (smallest[None, :] >= q_end[:, None]) & (q_end[:, None] <= T)
    some = (before | (blocks[None, :] == blocks[:, None])) & (largest[None, :] > q_start[:, None])
    partial = some & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = dense.to(torch.int32)[None, None]
        order = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32), order.to(torch.int32)

    def visible(b, h, q, kv):
        return (kv <= q) & (q < subtree_end[kv])

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=(block, block),
                                    mask_mod=visible, seq_lengths=(T, T))


def flex_kernel(device: torch.device):
    """``flex_attention`` for ``device``: compiled (once per process) where ``FLEX_COMPILE`` names
    the device, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    backend = FLEX_COMPILE.get(device.type)
    if backend is None:
        return flex_attention
    if (device.type, backend) not in _compiled_flex:
        _compiled_flex[device.type, backend] = torch.compile(flex_attention, backend=backend, dynamic=True)
    return _compiled_flex[device.type, backend]


def tree_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flex_attention over a packed row with its ``BlockMask`` (:func:`tree_block_mask`).

    ``query`` [1, H, T, D], ``key``/``value`` [1, Hkv, T, D]; on CUDA the kernel is compiled with
    dynamic shapes, so rows of every length share it (:func:`flex_kernel`). Returns ([1, T, H, D], None) as transformers' attention functions do."""
    if dropout:
        raise ValueError("the packed update's flex_attention runs without attention dropout")
    if query.shape[1] & (query.shape[1] - 1):  # flex_attention's grouped heads want a power of two
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = flex_kernel(query.device)(query, key, value, block_mask=attention_mask, scale=scaling,
                                    enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


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
