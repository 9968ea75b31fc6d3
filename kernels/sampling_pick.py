"""The fused sampler's finish step for one row (``sampling_kernels.py`` calls it from its kernels;
``sampling.py`` explains the scheme): merge the chunks' statistics, draw the row's uniform, find the
chunk and then the token the draw lands on."""

from __future__ import annotations

import triton
import triton.language as tl

from .counter_rng import uniform53


@triton.jit
def _load_span(logits_ptr, stride_b, stride_v, lo_ptr, row, start, V, N: tl.constexpr, HAS_LO: tl.constexpr):
    """Entries [start, start + N) of one row as fp32 [N]; padding and truncated entries are -inf."""
    offs = start + tl.arange(0, N)
    # int64 row offset; int32 column offsets (the launcher guarantees V * stride_v < 2^31), which
    # keep Triton's contiguity analysis intact so stride_v == 1 gives vector loads.
    ptrs = logits_ptr + row.to(tl.int64) * stride_b + offs * stride_v
    x = tl.load(ptrs, mask=offs < V, other=float("-inf")).to(tl.float32)
    if HAS_LO:
        # `x < lo` is False for NaN, so a NaN survives and still marks the row invalid.
        x = tl.where(x < tl.load(lo_ptr + row), float("-inf"), x)
    return x


@triton.jit
def _finish_row(
    row,
    logits_ptr,
    stride_b,
    stride_v,
    temp_ptr,
    temp_scalar,
    lo_ptr,
    seed_ptr,
    seed_scalar,
    pos_ptr,
    rec_ptr,
    c_ptr,
    tok_ptr,
    logp_ptr,
    ent_ptr,
    valid_ptr,
    V,
    NC,
    RUNS: tl.constexpr,
    RUN: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    HAS_LO: tl.constexpr,
    PER_ROW_SEED: tl.constexpr,
    HAS_POS: tl.constexpr,
):
    """One row: merge the chunk stats, draw the token, write token/log-prob/entropy/valid.
    A sampled token is found in three steps, each a float64 cumulative sum: the chunk (from the
    chunk masses), the run inside it (from the streaming pass's run sums), and the entry inside
    that run (re-read: RUN entries of the logits). Greedy rows re-read the chunk's argmax."""
    if PER_ROW_TEMP:
        t = tl.load(temp_ptr + row)
    else:
        t = temp_scalar
    greedy = t <= 0.0
    scale = 1.4426950408889634 / tl.where(greedy, 1.0, t)
    CHUNK: tl.constexpr = RUNS * RUN
    idx = tl.arange(0, BLOCK_NC)
    base = row.to(tl.int64) * NC
    m_t, delta, mass, total, entropy, e_max = _merge_chunks(rec_ptr, base, idx, NC, scale)
    valid = (total > 0.0) & (total < float("inf"))  # False for NaN too
    pick, frac = _pick_chunk(
        mass, idx, _row_uniform(row, seed_ptr, seed_scalar, pos_ptr, PER_ROW_SEED, HAS_POS)
    )
    first_max = tl.min(tl.where(m_t == tl.max(m_t, 0), idx, BLOCK_NC), 0)
    ch = tl.where(greedy, first_max, pick)
    ch = tl.where(valid, ch, 0)

    m_ch = tl.sum(tl.where(idx == ch, m_t, 0.0), 0)
    if greedy:
        # The first entry of the first chunk holding the max; its mass is e_max.
        # (Names differ between the branches: the compiler wants a name's type the same in both.)
        x_all = _load_span(logits_ptr, stride_b, stride_v, lo_ptr, row, ch * CHUNK, V, CHUNK, HAS_LO)
        tok_in = tl.argmax(x_all, 0)
        e_tok = e_max
    else:
        tok_in, e_tok = _pick_in_chunk(
            logits_ptr,
            stride_b,
            stride_v,
            lo_ptr,
            c_ptr,
            row,
            base + ch,
            ch * CHUNK,
            m_ch,
            scale,
            frac,
            V,
            RUNS,
            RUN,
            HAS_LO,
        )
    # The token's mass relative to R is e_tok 2^delta_ch; taking the log of e_tok itself (not of
    # its d) lets e_tok's own rounding cancel against the same term inside S.
    delta_ch = tl.sum(tl.where(idx == ch, delta, 0.0), 0)
    logp = tl.log(e_tok) - tl.log(total) + 0.6931471805599453 * delta_ch

    token = tl.where(valid, ch.to(tl.int64) * CHUNK + tok_in, -1)
    tl.store(tok_ptr + row, token)
    tl.store(logp_ptr + row, tl.where(valid, logp, float("nan")))
    tl.store(ent_ptr + row, tl.where(valid, entropy, float("nan")))
    tl.store(valid_ptr + row, valid)


@triton.jit
def _merge_chunks(rec_ptr, base, idx, NC, scale):
    """Merge the NC chunk records of a row (record index base + idx) into its stats: the chunk
    maxima m_t, each chunk's log2 offset delta_t and mass S_t relative to the row's reference,
    the total S, the entropy H and e_max (the max entry's own mass).

    Relative to R = r_t of the max chunk: chunk mass S_t = s_t 2^delta_t with
    delta_t = r_t - R <= 0, S = sum S_t, W = sum 2^delta_t (w_t + delta_t s_t). The max entry
    has d = rho (the residual of M * scale) and mass e_max = 2^rho, bit for bit as the streaming
    pass made it; H = ln(S / e_max) - ln 2 * (W - rho S) / S is ln S - ln 2 * W / S taken
    relative to that entry, and exactly 0 for a one-hot row (S == e_max, W == rho S)."""
    ok = idx < NC
    rec = rec_ptr + (base + idx) * 4
    m_t = tl.load(rec, mask=ok, other=float("-inf"), cache_modifier=".cg")
    s_t = tl.load(rec + 1, mask=ok, other=0.0, cache_modifier=".cg")
    w_t = tl.load(rec + 2, mask=ok, other=0.0, cache_modifier=".cg")
    big_m = tl.max(m_t, 0)
    m_ref = tl.where(big_m == float("-inf"), 0.0, big_m)
    big_r = m_ref * scale
    # An all -inf chunk has no mass (and no reference): delta -inf, not 0 - R.
    delta = tl.where(m_t == float("-inf"), float("-inf"), m_t * scale - big_r)
    r_t = tl.exp2(delta)
    mass = s_t * r_t
    total = tl.sum(mass, 0)
    w_all = tl.sum(r_t * (w_t + tl.maximum(delta, -1000.0) * s_t), 0)
    rho = tl.fma(m_ref, scale, -big_r)
    e_max = tl.exp2(rho)
    # fma(rho, S, 0) rounds rho * S once, as the streaming pass rounded e_max * rho into W; a plain
    # product could be fused with the subtraction, and ln S - ln e_max (not ln(S / e_max), whose
    # division is approximate) is exactly 0 when S == e_max.
    entropy = tl.log(total) - tl.log(e_max) - 0.6931471805599453 * (w_all - tl.fma(rho, total, 0.0)) / total
    return m_t, delta, mass, total, entropy, e_max


@triton.jit
def _row_uniform(row, seed_ptr, seed_scalar, pos_ptr, PER_ROW_SEED: tl.constexpr, HAS_POS: tl.constexpr):
    """The row's 53-bit uniform (float64), from its seed and position (0 without positions)."""
    if PER_ROW_SEED:
        seed = tl.load(seed_ptr + row).to(tl.int64)
    else:
        seed = seed_scalar.to(tl.int64)
    if HAS_POS:
        pos = tl.load(pos_ptr + row).to(tl.int64)
    else:
        pos = seed * 0
    return uniform53(seed, pos)


@triton.jit
def _pick_chunk(mass, idx, u):
    """Inverse CDF over the chunk masses [BLOCK_NC] with the uniform u, cumulative sums in
    float64: (the chunk, where the target falls inside it as a fraction of its mass)."""
    mass64 = mass.to(tl.float64)
    cum = tl.cumsum(mass64, 0)
    target = u * tl.max(cum, 0)
    pick = tl.sum((cum <= target).to(tl.int32), 0)
    # Rounding can leave target at or past the last boundary: take the last chunk with mass.
    pick = tl.minimum(pick, tl.max(tl.where(mass > 0.0, idx, -1), 0))
    sel = idx == pick
    frac = tl.sum(tl.where(sel, target - (cum - mass64), 0.0), 0) / tl.sum(tl.where(sel, mass64, 0.0), 0)
    return pick, frac


@triton.jit
def _pick_in_chunk(
    logits_ptr,
    stride_b,
    stride_v,
    lo_ptr,
    c_ptr,
    row,
    out,
    start,
    m_ch,
    scale,
    frac,
    V,
    RUNS: tl.constexpr,
    RUN: tl.constexpr,
    HAS_LO: tl.constexpr,
):
    """The entry at fraction ``frac`` of the mass of the chunk whose record index is ``out`` and
    whose first entry is ``start`` (max m_ch): (its index in the chunk, its mass e_tok)."""
    # The run holding the target, from the run sums of the streaming pass.
    c_idx = tl.arange(0, RUNS)
    c = tl.load(c_ptr + out * RUNS + c_idx, cache_modifier=".cg").to(tl.float64)
    c_cum = tl.cumsum(c, 0)
    goal = frac * tl.sum(c, 0)
    run = tl.sum((c_cum <= goal).to(tl.int32), 0)
    run = tl.minimum(run, tl.max(tl.where(c > 0.0, c_idx, -1), 0))
    on_run = c_idx == run
    # Where the target falls inside the run, as a fraction of the run's mass: the entry is
    # then picked in proportion to its float64 share of the run, so a run sum's fp32 rounding
    # changes each entry's probability by a relative ~1e-7 at most (as for a chunk's sum).
    before = tl.sum(tl.where(on_run, c_cum - c, 0.0), 0)
    frac_run = (goal - before) / tl.sum(tl.where(on_run, c, 0.0), 0)
    # Re-read that run; the same arithmetic as the streaming pass gives the same masses.
    x = _load_span(logits_ptr, stride_b, stride_v, lo_ptr, row, start + run * RUN, V, RUN, HAS_LO)
    e = tl.exp2(tl.fma(x, scale, -(tl.where(m_ch == float("-inf"), 0.0, m_ch) * scale)))
    e_idx = tl.arange(0, RUN)
    e64 = e.to(tl.float64)
    k = tl.sum((tl.cumsum(e64, 0) <= frac_run * tl.sum(e64, 0)).to(tl.int32), 0)
    # Rounding can put the target at or past the run's end: stay on its last entry with mass.
    k = tl.minimum(k, tl.max(tl.where(e > 0.0, e_idx, -1), 0))
    return run * RUN + k, tl.sum(tl.where(e_idx == k, e, 0.0), 0)
