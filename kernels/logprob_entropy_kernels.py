"""The Triton kernels of ``logprob_entropy``: fold a block of logits into per-token running
statistics (forward), and overwrite a block of logits with dL/dlogits (backward).
``logprob_entropy.py`` explains the scheme and launches them."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logprob_entropy_fwd_kernel(
    logits_ptr,
    stride_row,
    n_cols,
    col0,
    tgt_ptr,
    m_ptr,
    s_ptr,
    w_ptr,
    zt_ptr,
    inv_temp,
    BLOCK: tl.constexpr,
):
    """Fold one row of a logits block into that row's running (m, s, w) and pick its target.

    One program per row. ``m``/``s``/``w``/``zt`` are fp32 [T]; ``zt`` is written only when the
    row's target lies in columns [col0, col0 + n_cols).
    """
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    w = tl.load(w_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Rescale the old sums to the new max. Guards: an empty history (s == 0, m == -inf) must
        # not turn (m - m_new) * s into -inf * 0 = NaN, and -inf logits contribute nothing.
        alpha = tl.where(s > 0, tl.exp(m - m_new), 0.0)
        w = alpha * (w + tl.where(s > 0, m - m_new, 0.0) * s)
        s = alpha * s
        live = z > float("-inf")
        d = tl.where(live, z - m_new, 0.0)
        e = tl.where(live, tl.exp(d), 0.0)
        s += tl.sum(e, axis=0)
        w += tl.sum(e * d, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(w_ptr + row, w)
    local = tl.load(tgt_ptr + row) - col0
    hit = (local >= 0) & (local < n_cols)
    zt = tl.load(row_ptr + local, mask=hit, other=0.0).to(tl.float32) * inv_temp
    tl.store(zt_ptr + row, zt, mask=hit)


@triton.jit
def _logprob_entropy_bwd_kernel(
    logits_ptr,
    stride_row,
    n_cols,
    col0,
    tgt_ptr,
    logz_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    inv_temp,
    BLOCK: tl.constexpr,
):
    """Overwrite one tile of a logits block with dL/dlogits, in the block's dtype.

    Grid (rows, column tiles). Row inputs are fp32 [T]: logZ, entropy H, and the upstream
    gradients of the log-prob and of the entropy (zero for ignored rows).
    """
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    ptrs = logits_ptr + row.to(tl.int64) * stride_row + cols
    logz = tl.load(logz_ptr + row)
    ent = tl.load(ent_ptr + row)
    glp = tl.load(glp_ptr + row)
    gent = tl.load(gent_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    x = tl.load(ptrs, mask=mask, other=0.0)
    logp = x.to(tl.float32) * inv_temp - logz
    p = tl.exp(logp)
    # p * (log p + H) is 0 * (-inf) for a -inf logit; its limit is 0.
    plogp = tl.where(p > 0, p * (logp + ent), 0.0)
    d = -glp * p - gent * plogp
    d = tl.where(cols + col0 == tgt, d + glp, d) * inv_temp
    tl.store(ptrs, d.to(x.dtype), mask=mask)
