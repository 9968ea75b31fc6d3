"""How the update runs the model's attention over packed rows.

Hugging Face Llama-family models (Llama, Qwen2, Qwen3) call the attention function named by
``config._attn_implementation``, hand it a ready 4-D ``attention_mask`` untouched (a ``BlockMask``
for ``flex_attention``) and pass extra keyword arguments of the model's forward down to it;
``position_ids`` set the rotary positions (``hf_adapter.py`` holds those assumptions and the
versions they were checked against). So a tree-packed row (``tree_batch.TreeBatch``) runs through
the model's own forward, its attention as one of:

- ``flex_attention`` (CUDA): a block mask from the tree rule (key j visible to query i iff
  j <= i < subtree_end[j]); blocks outside every path are skipped, so attention costs what the
  paths cost, not T^2. The block mask is worked out from per-block bounds of ``subtree_end``
  (no T x T mask, nothing compiled), and ``flex_attention`` is compiled with dynamic shapes: one
  graph serves rows of every length (others rows of a single block, and rows with prompt contexts
  in front: at most four), so a new micro-batch length does not compile it again.
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
from collections.abc import Callable
from typing import Optional

import torch

from arpo_fast.train.hf_adapter import attention_function, sliding_window_layers

PATH_SDPA = "arpo_path_sdpa"  # the name the packed rows' sdpa is registered under with transformers
TREE_FLEX = "arpo_tree_flex"  # and their flex_attention
FLEX_BLOCK = 128  # flex_attention's default block size (queries and keys)
# Devices whose flex_attention is compiled, and the torch.compile backend. The CPU runs it eagerly
# (forward only: torch has no CPU flex backward), which is what the tests use.
FLEX_COMPILE = {"cuda": "inductor"}
_compiled_flex: dict = {}


def check_model(model, packed: bool) -> None:
    """A packed update needs every layer to attend to the whole path (no sliding window)."""
    if packed and sliding_window_layers(model):
        raise ValueError(
            "the model has sliding-window attention layers, which the tree-packed update "
            "does not mask; use --packed-update false"
        )


@contextlib.contextmanager
def attention_implementation(model, name: str, packed: bool):
    """The model's layers call attention function ``name`` (a resolved one) inside the block; for
    packed rows, ours in place of sdpa and flex_attention."""
    function: Optional[Callable] = None
    if packed and name in ("sdpa", "flex_attention"):
        own: dict[str, tuple[str, Callable]] = {
            "sdpa": (PATH_SDPA, path_sdpa_attention),
            "flex_attention": (TREE_FLEX, tree_flex_attention),
        }
        name, function = own[name]
    with attention_function(model, name, function):
        yield


def path_masks(path_keys: torch.Tensor, path_sizes: list[tuple[int, int]], context: int = 0) -> list[tuple]:
    """Per path of a packed row (``packing.TreeBatch``): (keys: int64 [K] positions among the
    ``context`` context keys then the row's, queries: int64 [q] the row positions of the last q of
    them, mask: bool [q, K], True where a query attends)."""
    out = []
    for keys, (K, q) in zip(path_keys.split([k for k, _ in path_sizes]), path_sizes):
        depth = torch.arange(K, device=keys.device)
        out.append((keys, keys[K - q :] - context, depth[None, :] <= depth[K - q :, None]))
    return out


class ContextRun:
    """``tree_context`` while a prompt context (``packing.PromptContext``) runs through the model
    alone, causally: each layer's keys and values are kept (``keys``/``values`` by layer index; the
    first ones, so a checkpointed layer's recomputation leaves them). With ``inject`` they pass
    through an identity whose backward adds the gradient of the leaf later put in their slot
    (``slots[layer, "key" or "value"]``, a one-item list; ``contexts.ContextCache``)."""

    def __init__(self, inject: bool = False):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots: Optional[dict[tuple[int, str], list]] = {} if inject else None


class _AddSlotGrad(torch.autograd.Function):
    """Identity whose backward adds the gradient gathered by the leaf in ``slot`` (if any)."""

    @staticmethod
    def forward(ctx, x, slot):
        ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        gathered = ctx.slot[0].grad if ctx.slot else None
        return (grad if gathered is None else grad + gathered.to(grad.dtype)), None


class ContextKV:
    """``tree_context`` of a packed row with prompt contexts: per layer, their keys and values
    ([1, Hkv, C, D], the row's contexts in order) go in front of the row's own."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values


def _with_context(module, key, value, tree_context) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a layer attends over: the row's, after its contexts' (``ContextKV``);
    a ``ContextRun`` keeps the layer's own."""
    layer = module.layer_idx
    if isinstance(tree_context, ContextRun):
        tree_context.keys.setdefault(layer, key)
        tree_context.values.setdefault(layer, value)
        if tree_context.slots is not None:
            key = _AddSlotGrad.apply(key, tree_context.slots.setdefault((layer, "key"), []))
            value = _AddSlotGrad.apply(value, tree_context.slots.setdefault((layer, "value"), []))
        return key, value
    return _after(tree_context.keys[layer], key), _after(tree_context.values[layer], value)


def _after(context: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``context`` then ``own`` along the sequence ([1, heads, len, D]), laid out as the layer's
    own keys are (a transposed [1, len, heads, D]), so that rows with and without contexts share
    one compiled flex_attention."""
    return torch.cat([context.to(own.dtype).transpose(1, 2), own.transpose(1, 2)], dim=1).transpose(1, 2)


def _causal(query, key, value, scaling) -> tuple[torch.Tensor, None]:
    """Plain causal attention (a prompt context's own run), [1, T, H, D]."""
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def path_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    tree_paths=None,
    tree_context=None,
    **kwargs,
):
    """Attention over a packed row, one ``scaled_dot_product_attention`` per path.

    ``query`` [1, H, T, D], ``key``/``value`` [1, Hkv, T, D]; ``tree_paths`` from
    :func:`path_masks`; ``tree_context``: the row's contexts (``ContextKV``), or a ``ContextRun``.
    Returns ([1, T, H, D], None) as transformers' attention functions do."""
    if tree_context is not None:
        key, value = _with_context(module, key, value, tree_context)
        if isinstance(tree_context, ContextRun):
            return _causal(query, key, value, scaling)
    if tree_paths is None:
        raise ValueError("the packed update's sdpa attention needs tree_paths (from path_masks)")
    if key.shape[1] != query.shape[1]:  # grouped heads: with a mask, CUDA's fused kernels want them whole
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    outs, rows = [], []
    for keys, queries, mask in tree_paths:
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query.index_select(2, queries),
                key.index_select(2, keys),
                value.index_select(2, keys),
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
            )
        )
        rows.append(queries)
    order = torch.argsort(torch.cat(rows))  # every row position is one path's query exactly once
    return torch.cat(outs, dim=2).index_select(2, order).transpose(1, 2).contiguous(), None


def key_bounds(
    subtree_end: torch.Tensor, context_lo=None, context_hi=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) int64 [C + T]: key k (the C context keys, then the row's) is seen by the row's
    queries lo[k] <= i < hi[k]; a row key j by j..subtree_end[j] - 1 (``packing.TreeBatch``)."""
    lo, hi = torch.arange(subtree_end.numel(), device=subtree_end.device), subtree_end
    if context_lo is not None and context_lo.numel():
        lo, hi = torch.cat([context_lo, lo]), torch.cat([context_hi, hi])
    return lo, hi


def tree_mask(subtree_end: torch.Tensor, implementation: str, context_lo=None, context_hi=None):
    """The attention mask of a packed row (``packing.TreeBatch``: ``subtree_end`` int64 [T], and
    its contexts' query bounds, :func:`key_bounds`).

    Returns a ``BlockMask`` for flex_attention (:func:`tree_block_mask`), else a bool [1, 1, T, C + T]
    (True: attend)."""
    lo, hi = key_bounds(subtree_end, context_lo, context_hi)
    if implementation == "flex_attention":
        return tree_block_mask(lo, hi, subtree_end.numel())
    i = torch.arange(subtree_end.numel(), device=subtree_end.device)[:, None]
    return ((lo[None, :] <= i) & (i < hi[None, :]))[None, None]


def tree_block_mask(lo: torch.Tensor, hi: torch.Tensor, T: int, block: int = FLEX_BLOCK):
    """flex_attention's ``BlockMask`` for T queries and keys seen by queries lo[k] <= i < hi[k]
    (:func:`key_bounds`; without contexts, the same mask ``create_block_mask`` finds by evaluating
    every (query, key) pair), here from per-block bounds of lo and hi.

    A query block [a, b) and a key block have all pairs visible iff every key's lo <= a and hi >= b
    (and neither block is cut short by the end: ``create_block_mask`` pads with False); some pair
    possibly visible iff some key's lo < b and some key's hi > a (for row keys, whose lo is their
    own position, that is exact: the key block is not after the query block and one of its keys'
    subtrees ends after a). The possibly-visible blocks that are not whole go through the mask."""
    from torch.nn.attention.flex_attention import BlockMask

    K, device = lo.numel(), lo.device
    nq, nk = -(-T // block), -(-K // block)
    # Keys past the end (the last block's padding) are seen by no query; the mask reads these
    # padded bounds, so it never indexes past them.
    lo = torch.nn.functional.pad(lo, (0, nk * block - K), value=T + 1)
    hi = torch.nn.functional.pad(hi, (0, nk * block - K), value=0)
    lo_min, lo_max = lo.view(nk, block).amin(1), lo.view(nk, block).amax(1)
    hi_min, hi_max = hi.view(nk, block).amin(1), hi.view(nk, block).amax(1)
    q_start = torch.arange(nq, device=device)[:, None] * block
    q_end = q_start + block
    whole_keys = (torch.arange(nk, device=device)[None, :] + 1) * block <= K
    full = (lo_max[None, :] <= q_start) & (hi_min[None, :] >= q_end) & (q_end <= T) & whole_keys
    some = (lo_min[None, :] < torch.clamp(q_end, max=T)) & (hi_max[None, :] > q_start)
    partial = some & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = dense.to(torch.int32)[None, None]
        order = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(-1).to(torch.int32), order.to(torch.int32)

    def visible(b, h, q, kv):
        return (lo[kv] <= q) & (q < hi[kv])

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=(block, block), mask_mod=visible, seq_lengths=(T, K)
    )


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


def tree_flex_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, tree_context=None, **kwargs
):
    """flex_attention over a packed row with its ``BlockMask`` (:func:`tree_block_mask`).

    ``query`` [1, H, T, D], ``key``/``value`` [1, Hkv, T, D]; ``tree_context`` as in
    :func:`path_sdpa_attention`. On CUDA the kernel is compiled with dynamic shapes, so rows of
    every length share it (:func:`flex_kernel`). Returns ([1, T, H, D], None) as transformers'
    attention functions do."""
    if dropout:
        raise ValueError("the packed update's flex_attention runs without attention dropout")
    if tree_context is not None:
        key, value = _with_context(module, key, value, tree_context)
        if isinstance(tree_context, ContextRun):
            return _causal(query, key, value, scaling)
    if query.shape[1] & (query.shape[1] - 1):  # flex_attention's grouped heads want a power of two
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = flex_kernel(query.device)(
        query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None
