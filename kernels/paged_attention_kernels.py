"""The Triton programs of the paged attention (``paged_attention.py`` launches them and documents
the layout): a K/V tile gathered through the block table, one online-softmax step over it, and the
decode and extend kernels built from the two."""

import triton
import triton.language as tl


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
