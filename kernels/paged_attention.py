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
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import cdiv, interpret_mode, next_power_of_2, use_triton

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _load_kv_tile(
    ptr, tables_ptr, stride_tb, b, t, tmask, kvh, s_blk, s_tok, s_h, d, dmask, PAGE: tl.constexpr
):
    """Keys or values of tokens t ([BLOCK_N]) of sequence b, through its block table: [BLOCK_N, BLOCK_D]."""
    page = tl.load(tables_ptr + b * stride_tb + t // PAGE, mask=tmask, other=0).to(tl.int64)
    row = page * s_blk + (t % PAGE).to(tl.int64) * s_tok + kvh * s_h
    return tl.load(ptr + row[:, None] + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    visible,
    k_ptr,
    v_ptr,
    tables_ptr,
    stride_tb,
    b,
    t,
    tmask,
    kvh,
    sk_blk,
    sk_tok,
    sk_h,
    sv_blk,
    sv_tok,
    sv_h,
    d,
    dmask,
    qk_scale,
    PAGE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key tile of the online softmax: scores of q [rows, BLOCK_D] against keys t, masked to
    ``visible`` ([rows or 1, BLOCK_N]), folded into (acc, m_i, l_i), which it returns updated."""
    k = _load_kv_tile(k_ptr, tables_ptr, stride_tb, b, t, tmask, kvh, sk_blk, sk_tok, sk_h, d, dmask, PAGE)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv_tile(v_ptr, tables_ptr, stride_tb, b, t, tmask, kvh, sv_blk, sv_tok, sv_h, d, dmask, PAGE)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    tables_ptr,
    lens_ptr,
    sq_b,
    sq_h,
    sk_blk,
    sk_tok,
    sk_h,
    sv_blk,
    sv_tok,
    sv_h,
    so_b,
    so_h,
    so_s,
    stride_tb,
    qk_scale,
    num_splits,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    heads = kvh * G + g
    q = tl.load(
        q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    ctx = tl.load(lens_ptr + b)
    # This split's slice of the context, in whole tiles.
    tiles = tl.cdiv(ctx, BLOCK_N)
    per_split = tl.cdiv(tiles, num_splits)
    lo = split * per_split * BLOCK_N
    hi = tl.minimum(ctx, (split + 1) * per_split * BLOCK_N)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < hi
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            tmask[None, :],
            k_ptr,
            v_ptr,
            tables_ptr,
            stride_tb,
            b,
            t,
            tmask,
            kvh,
            sk_blk,
            sk_tok,
            sk_h,
            sv_blk,
            sv_tok,
            sv_h,
            d,
            dmask,
            qk_scale,
            PAGE,
            PRECISION,
            UPCAST,
        )

    omask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        # Unnormalised partials; an empty split leaves m = -inf, l = 0 and acc = 0.
        base = b * so_b + heads * so_h + split * so_s
        tl.store(out_ptr + base[:, None] * BLOCK_D + d[None, :], acc, mask=omask)
        tl.store(m_ptr + base, m_i, mask=gmask)
        tl.store(l_ptr + base, l_i, mask=gmask)
    else:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=omask,
        )


@triton.jit
def _paged_extend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    lens_ptr,
    cu_ptr,
    sq_t,
    sq_h,
    sk_blk,
    sk_tok,
    sk_h,
    sv_blk,
    sv_tok,
    sv_h,
    so_t,
    so_h,
    stride_tb,
    qk_scale,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // G
    q_start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - q_start
    if tile * BLOCK_M >= n:
        return
    ctx = tl.load(lens_ptr + b)
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < n
    qpos = ctx - n + m  # padding rows get positions >= ctx and see every key: never an empty row
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    rows = (q_start + m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * sq_t + h * sq_h + d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(ctx, ctx - n + (tile + 1) * BLOCK_M)  # keys past the tile's last query are masked
    for start in range(0, end, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < end
        # Key 0 is visible to every row, so the running max is finite after the first tile.
        visible = tmask[None, :] & (t[None, :] <= qpos[:, None])
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            visible,
            k_ptr,
            v_ptr,
            tables_ptr,
            stride_tb,
            b,
            t,
            tmask,
            kvh,
            sk_blk,
            sk_tok,
            sk_h,
            sv_blk,
            sv_tok,
            sv_h,
            d,
            dmask,
            qk_scale,
            PAGE,
            PRECISION,
            UPCAST,
        )
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * so_t + h * so_h + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )


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
def _check(
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
    G, kv_heads, D = _check(q, k_cache, v_cache, block_tables, context_lens)
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
    G, _kv_heads, D = _check(q, k_cache, v_cache, block_tables, context_lens)
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


# ----------------------------------------------------------------------------- references
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
    _G, _, D = _check(q, k_cache, v_cache, block_tables, context_lens)
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
    _check(q, k_cache, v_cache, block_tables, context_lens)
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
