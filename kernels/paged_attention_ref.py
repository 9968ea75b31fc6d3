"""The pure-PyTorch references of the paged attention: every sequence's pages gathered into a dense
tensor, then masked SDPA (the "gather + SDPA" baseline of the benchmarks). The kernels in
``paged_attention.py`` are tested against these."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> tuple[int, int, int]:
    """Validate shapes and dtypes; return (group size G, kv heads, head dim)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [blocks, page, kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, page, kv_heads, head_dim = k_cache.shape
    if page & (page - 1):
        raise ValueError(f"page size must be a power of two, got {page}")
    if q.shape[-1] != head_dim or q.shape[-2] % kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit kv_heads={kv_heads}, head_dim={head_dim}: "
            "q heads must be a multiple of kv heads"
        )
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the head dim of q, k_cache and v_cache must be contiguous")
    if block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be a row-major [B, W] tensor")
    return q.shape[-2] // kv_heads, kv_heads, head_dim


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Pages of every sequence laid end to end: [B, kv_heads, W * page, head_dim]."""
    B, W = block_tables.shape
    _, page, kv_heads, D = cache.shape
    dense = cache.index_select(0, block_tables.reshape(-1).long()).view(B, W * page, kv_heads, D)
    return dense.transpose(1, 2)


def _sdpa(q, k, v, mask, scale):
    """q [B, H, M, D], k/v [B, Hk, L, D], mask bool [B, 1, M, L] (True = attend)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Reference of ``paged_attention_decode``: gather the pages, then masked SDPA (same signature;
    ``num_splits`` is accepted and ignored)."""
    _G, _, D = check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    scale = D**-0.5 if scale is None else scale
    k, v = _gather(k_cache, block_tables), _gather(v_cache, block_tables)
    t = torch.arange(k.shape[2], device=q.device)
    mask = (t[None, :] < context_lens[:, None].long())[:, None, None, :]
    return _sdpa(q[:, :, None, :], k, v, mask, scale)[:, :, 0, :]


def paged_attention_extend_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference of ``paged_attention_extend``: pad the queries per sequence, gather the pages,
    causal-masked SDPA, unpad."""
    check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    N, _H, D = q.shape
    B = context_lens.shape[0]
    scale = D**-0.5 if scale is None else scale
    if N == 0 or B == 0:
        return torch.empty_like(q)
    cu = cu_seqlens_q.long()
    n = cu[1:] - cu[:-1]
    m = torch.arange(max_seqlen_q, device=q.device)
    valid = m[None, :] < n[:, None]  # [B, M]
    rows = (cu[:-1, None] + m[None, :]).clamp(max=N - 1)
    q_pad = q[rows].transpose(1, 2)  # [B, H, M, D]
    k, v = _gather(k_cache, block_tables), _gather(v_cache, block_tables)
    t = torch.arange(k.shape[2], device=q.device)
    ctx = context_lens.long()
    qpos = ctx[:, None] - n[:, None] + m[None, :]  # padding rows land past ctx: never empty
    mask = (t[None, None, :] <= qpos[:, :, None]) & (t[None, None, :] < ctx[:, None, None])
    out = _sdpa(q_pad, k, v, mask[:, None], scale).transpose(1, 2)  # [B, M, H, D]
    return out[valid]
