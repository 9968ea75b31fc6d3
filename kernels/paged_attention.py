"""Attention over a paged KV cache: decode (one new query per sequence) and extend (several).

K and V live in pools of fixed-size pages, [num_blocks, page, kv_heads, head_dim]; a sequence's
tokens are found through its row of ``block_tables`` (token t is at page ``table[t // page]``,
offset ``t % page``). The kernels gather K/V through the table token by token inside each tile, so
a tile of ``BLOCK_N`` keys may span several pages and the page size is independent of the tile.

* ``_paged_decode_kernel``, grid (B, kv_heads, splits): one program per (sequence, KV head) serves
  the whole group of query heads that share that KV head (GQA), so each K/V byte is read once per
  step. With ``splits > 1`` (small batches) each program covers a slice of the context and writes
  partial softmax statistics that ``_merge_splits`` combines.
* ``_paged_extend_kernel``, grid (query tiles, B, q_heads): queries are the last ``n_b`` tokens of
  sequence b (positions ``[ctx_b - n_b, ctx_b)``), causal over the cached prefix and themselves.

Both use an online softmax in fp32 with exp2 and the scale folded in. Head dims that are not a power
of two are padded to one inside the kernel and masked. The references gather every sequence's pages
into a dense tensor and run masked SDPA (the "gather + SDPA" baseline of the benchmarks).
"""

from __future__ import annotations

import math

import torch
import triton

from ._dispatch import cdiv, interpret_mode, next_power_of_2, use_triton
from .paged_attention_kernels import _paged_decode_kernel, _paged_extend_kernel
from .paged_attention_ref import check_inputs, paged_attention_decode_ref, paged_attention_extend_ref

LOG2E = 1.4426950408889634


# On a GPU the decode kernel picks its key tile and pipeline depth by measurement (once per head
# layout); the interpreter runs one fixed configuration.
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
    for n in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]
_paged_decode_tuned = triton.autotune(_DECODE_CONFIGS, key=["G", "D", "PAGE", "SPLIT"])(_paged_decode_kernel)


# ----------------------------------------------------------------------------- launchers
def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products, not TF32, so fp32 engines match fp32 references.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter gets tl.dot wrong on 16-bit inputs (garbage of order 1e10), so
    # under the interpreter the tiles are widened to fp32 first; GPUs run the 16-bit dots.
    return interpret_mode() and dtype != torch.float32


def _default_splits(B: int, kv_heads: int, max_context: int, block_n: int) -> int:
    """Split the context when (sequence, KV head) programs alone would leave most SMs idle."""
    if B * kv_heads >= 256:
        return 1
    tiles = max(1, math.ceil(max_context / block_n))
    return max(1, min(tiles, 256 // max(1, B * kv_heads), 32))


def _merge_splits(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, D: int) -> torch.Tensor:
    """Combine per-split partials: acc [B, H, S, Dp], m and l [B, H, S] (log2 units) -> [B, H, D]."""
    m_max = m.amax(-1, keepdim=True)
    w = torch.exp2(m - m_max)  # empty splits have m = -inf: weight 0
    out = (acc * w[..., None]).sum(2) / (l * w).sum(-1)[..., None]
    return out[..., :D]


def _decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits):
    G, kv_heads, D = check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    B, H, _ = q.shape
    page = k_cache.shape[1]
    block_d = max(16, next_power_of_2(D))
    block_g = max(16, next_power_of_2(G))  # tl.dot wants M >= 16
    if num_splits is None:
        num_splits = _default_splits(B, kv_heads, block_tables.shape[1] * page, 64)
    out = torch.empty_like(q)
    if B == 0:
        return out
    split = num_splits > 1
    if split:
        acc = torch.empty((B, H, num_splits, block_d), dtype=torch.float32, device=q.device)
        m = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        target, strides = acc, (H * num_splits, num_splits, 1)
    else:
        m = l = out  # unused
        target, strides = out, (out.stride(0), out.stride(1), 0)
    if interpret_mode():
        kernel, tiles = _paged_decode_kernel, {"BLOCK_N": max(16, min(64, 8192 // block_d)), "num_warps": 4}
    else:
        kernel, tiles = _paged_decode_tuned, {}
    kernel[(B, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        target,
        m,
        l,
        block_tables,
        context_lens,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *strides,
        block_tables.stride(0),
        scale * LOG2E,
        num_splits,
        G=G,
        D=D,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        PAGE=page,
        SPLIT=split,
        PRECISION=_precision(q.dtype),
        UPCAST=_upcast(q.dtype),
        **tiles,
    )
    if split:
        out.copy_(_merge_splits(acc, m, l, D))
    return out


def _extend_triton(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, scale):
    G, _kv_heads, D = check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    N, H, _ = q.shape
    B = context_lens.shape[0]
    page = k_cache.shape[1]
    block_d = max(16, next_power_of_2(D))
    block_m = 64 if max_seqlen_q > 32 else 16
    block_n = 64 if block_d <= 64 else 32
    out = torch.empty_like(q)
    if N == 0 or B == 0:
        return out
    grid = (cdiv(max_seqlen_q, block_m), B, H)
    _paged_extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        cu_seqlens_q,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        scale * LOG2E,
        G=G,
        D=D,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        PAGE=page,
        PRECISION=_precision(q.dtype),
        UPCAST=_upcast(q.dtype),
        num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------- public API
def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence over its paged K/V.

    Args:
        q: [B, q_heads, head_dim], fp32/bf16/fp16; the query of each sequence's newest token.
        k_cache, v_cache: [num_blocks, page, kv_heads, head_dim], same dtype as q (page a power of
            two; q_heads a multiple of kv_heads). The newest token's K/V must already be written.
        block_tables: int32 [B, W], each sequence's pages (padding entries are never read).
        context_lens: int32 [B] >= 1, tokens per sequence including the newest.
        scale: softmax scale, default head_dim ** -0.5.
        num_splits: context splits per (sequence, KV head); None picks one from B, heads and W.

    Returns:
        [B, q_heads, head_dim] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_triton(q):
        return _decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    return paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_attention_extend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of several new tokens per sequence over the cached prefix and themselves.

    Args:
        q: [N, q_heads, head_dim], the new tokens of all sequences end to end (sequence b owns rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``, which sit at positions
            ``[context_lens[b] - n_b, context_lens[b])``); their K/V must already be written.
        k_cache, v_cache, block_tables, context_lens: as in ``paged_attention_decode``.
        cu_seqlens_q: int32 [B + 1], cumulative new-token counts (each count >= 1).
        max_seqlen_q: the largest count, a Python int (sizes the launch grid without a host sync).
        scale: softmax scale, default head_dim ** -0.5.

    Returns:
        [N, q_heads, head_dim] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_triton(q):
        return _extend_triton(
            q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, scale
        )
    return paged_attention_extend_ref(
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, scale
    )
