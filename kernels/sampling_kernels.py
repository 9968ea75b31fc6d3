"""The fused sampler's Triton kernels: the streaming pass over the logits and the per-row finish
step. ``sampling.py`` explains the scheme and launches them."""

from __future__ import annotations

import triton
import triton.language as tl

from .sampling_pick import _finish_row


@triton.jit
def _chunk_stats(x, out, ok, a, lo, rec_ptr, c_ptr, scale, RUNS: tl.constexpr, HAS_LO: tl.constexpr):
    """The stats of W chunks, one per warp: x fp32 [RUNS, W, G, I]. Writes each chunk's record
    (m, s, w, m) and its run sums at record index out (row * NC + chunk, int64 [1, W, 1, 1])
    where ok."""
    if HAS_LO:
        # `x < lo` is False for NaN, so a NaN survives and still marks the row invalid.
        x = tl.where(x < lo, float("-inf"), x)
    # Reduce over the registers (g) first, then the lanes: each reduction is one shuffle tree.
    m = tl.max(tl.max(tl.max(x, 2, keep_dims=True), 3, keep_dims=True), 0, keep_dims=True)
    # An all -inf chunk gets s = w = 0 (not NaN from -inf - -inf); NaN or +inf entries make s NaN.
    d = tl.fma(x, scale, -(tl.where(m == float("-inf"), 0.0, m) * scale))
    e = tl.exp2(d)
    c = tl.sum(tl.sum(e, 2, keep_dims=True), 3, keep_dims=True)
    # max(d, -1000) turns 0 * -inf into 0 for masked entries without a branch (2^-1000 == 0).
    wd = tl.sum(tl.sum(e * tl.maximum(d, -1000.0), 2, keep_dims=True), 3, keep_dims=True)
    # One record (m, s, w, m) per chunk: with several warps per program, each store changes
    # the layout through shared memory, so one store for the three saves barriers.
    rec = tl.join(tl.join(m, tl.sum(c, 0, keep_dims=True)), tl.join(tl.sum(wd, 0, keep_dims=True), m))
    field = tl.arange(0, 2)  # join puts its new dim last: rec[..., i, j] is field 2j + i
    rec_off = (
        out[:, :, :, :, None, None] * 4
        + field[None, None, None, None, :, None]
        + field[None, None, None, None, None, :] * 2
    )
    tl.store(rec_ptr + rec_off, rec, mask=ok[:, :, :, :, None, None])
    tl.store(c_ptr + out * RUNS + a, c, mask=ok)


@triton.jit
def _row_scale_lo(row, temp_ptr, temp_scalar, lo_ptr, PER_ROW_TEMP: tl.constexpr, HAS_LO: tl.constexpr):
    """(scale, lo) of rows ``row`` (any shape): scale = log2(e) / T (T <= 0: 1), lo the top-k/top-p
    threshold (0.0, unused, without one)."""
    if PER_ROW_TEMP:
        t = tl.load(temp_ptr + row)
    else:
        t = temp_scalar
    scale = 1.4426950408889634 / tl.where(t > 0.0, t, 1.0)
    if HAS_LO:
        lo = tl.load(lo_ptr + row)
    else:
        lo = 0.0
    return scale, lo


# Temperature: scale = log2(e) / T, so p ~ 2^(x * scale - r); greedy rows (T <= 0) use T = 1.
# Small helper calls are kept few in the streaming pass: Triton's interpreter, which runs the CPU
# tests, pays milliseconds per nested jit call per program (the finish step's helpers run once a
# row).


@triton.jit(do_not_specialize=["seed_scalar"])  # a seed of 1 must not become a constexpr
def _sample_kernel(
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
    count_ptr,
    tok_ptr,
    logp_ptr,
    ent_ptr,
    valid_ptr,
    V,
    NC,
    RUNS: tl.constexpr,
    G: tl.constexpr,
    I: tl.constexpr,
    W: tl.constexpr,
    LOOP: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    HAS_LO: tl.constexpr,
    PER_ROW_SEED: tl.constexpr,
    HAS_POS: tl.constexpr,
    FUSED: tl.constexpr,
    STAGES: tl.constexpr,
):
    """The streaming pass over chunks [pid * W * LOOP, (pid + 1) * W * LOOP) of one row: W warps,
    each reading LOOP chunks. Writes each chunk's record (m, s, w, m) into fp32 [B, NC, 4] and
    its run sums into fp32 [B, NC, RUNS]. With FUSED, the last program of the row to get here
    also runs the finish step for it."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    scale, lo = _row_scale_lo(row, temp_ptr, temp_scalar, lo_ptr, PER_ROW_TEMP, HAS_LO)

    # The chunk as [RUNS, W, G, I]: entry (a, w, g, i) is run a, entry g * I + i of the run, of
    # the chunk warp w reads. Triton puts the lanes on i and then on a (the registers on g), so a
    # run's sum, and every reduction over a chunk, stays inside one warp.
    RUN: tl.constexpr = G * I
    CHUNK: tl.constexpr = RUNS * RUN
    a = tl.arange(0, RUNS)[:, None, None, None]
    inner = a * RUN + tl.arange(0, G)[None, None, :, None] * I + tl.arange(0, I)[None, None, None, :]
    row_ptr = logits_ptr + row.to(tl.int64) * stride_b
    warp_chunk = tl.arange(0, W)[None, :, None, None]
    row_rec = row.to(tl.int64) * NC  # record index of the row's first chunk
    # Each warp reads LOOP chunks, one after another. Full chunks (all but a row's last ones) load
    # without masks, in a loop of their own: its address arithmetic is hoisted out of the loop, and
    # with STAGES > 1 Triton pipelines it (the next chunks are copied into shared memory while a
    # warp works on one).
    n_full = tl.minimum(tl.maximum(V // (W * CHUNK) - pid * LOOP, 0), LOOP)
    for k in tl.range(0, n_full, num_stages=STAGES):
        chunk = (pid * LOOP + k) * W + warp_chunk
        x = tl.load(row_ptr + (chunk * CHUNK + inner) * stride_v).to(tl.float32)
        _chunk_stats(x, row_rec + chunk, chunk < NC, a, lo, rec_ptr, c_ptr, scale, RUNS, HAS_LO)
    for k in range(n_full, LOOP):
        chunk = (pid * LOOP + k) * W + warp_chunk
        offs = chunk * CHUNK + inner
        x = tl.load(row_ptr + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32)
        _chunk_stats(x, row_rec + chunk, chunk < NC, a, lo, rec_ptr, c_ptr, scale, RUNS, HAS_LO)

    if FUSED:
        # Every warp's stores come before the release below; the acquire makes all the row's
        # stores visible to the last program, which reads them through L2 (cache_modifier .cg).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) - 1:
            tl.store(count_ptr + row, 0)  # ready for the next call
            _finish_row(
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
                RUNS,
                RUN,
                BLOCK_NC,
                PER_ROW_TEMP,
                HAS_LO,
                PER_ROW_SEED,
                HAS_POS,
            )


@triton.jit
def _sample_persistent_kernel(
    logits_ptr,
    stride_b,
    stride_v,
    temp_ptr,
    temp_scalar,
    lo_ptr,
    rec_ptr,
    c_ptr,
    B,
    V,
    NC,
    NCF,
    steps_per_program,
    steps,
    RUNS: tl.constexpr,
    G: tl.constexpr,
    I: tl.constexpr,
    W: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    HAS_LO: tl.constexpr,
    STAGES: tl.constexpr,
):
    """The streaming pass with a grid sized to the GPU, not to the batch: the batch's full chunks
    (NCF per row), in row-major order, go in steps of W (one per warp); program pid takes steps
    [pid * steps_per_program, ...) in turn, crossing rows as it goes, so every program streams
    about the same number of chunks. Then the rows' last, partial chunks (NC > NCF), spread over
    the programs. Writes the same records and run sums as _sample_kernel, bit for bit; the finish
    step runs as its own kernel."""
    pid = tl.program_id(0)
    RUN: tl.constexpr = G * I
    CHUNK: tl.constexpr = RUNS * RUN
    a = tl.arange(0, RUNS)[:, None, None, None]
    inner = a * RUN + tl.arange(0, G)[None, None, :, None] * I + tl.arange(0, I)[None, None, None, :]
    warp = tl.arange(0, W)[None, :, None, None]
    first = pid * steps_per_program
    task = first * W + warp  # this warp's chunk, counted over the whole batch's full chunks
    row = task // NCF
    chunk = task - row * NCF
    # Running offsets, moved on by W chunks a step (and to the next row past its full chunks):
    # the chunk's first entry in the logits, and its record index row * NC + chunk.
    at = row.to(tl.int64) * stride_b + chunk * (CHUNK * stride_v)
    out = row.to(tl.int64) * NC + chunk
    next_row = stride_b - (NCF * CHUNK * stride_v).to(tl.int64)  # < V * stride_v < 2^31
    # (scale and lo are set inside the loops only: a name set before a loop and in it must keep
    # its type. With one temperature the compiler hoists the division out of the loop.)
    for _ in tl.range(first, tl.minimum(first + steps_per_program, steps), num_stages=STAGES):
        live = row < B  # the last step's warps may run past the batch: they read row 0
        x = tl.load(logits_ptr + tl.where(live, at, 0) + inner * stride_v)
        scale, lo = _row_scale_lo(tl.where(live, row, 0), temp_ptr, temp_scalar, lo_ptr, PER_ROW_TEMP, HAS_LO)
        _chunk_stats(x.to(tl.float32), out, live, a, lo, rec_ptr, c_ptr, scale, RUNS, HAS_LO)
        chunk += W  # the launcher makes sure W <= NCF, so a step crosses at most one row end
        at += W * CHUNK * stride_v
        out += W
        wrap = chunk >= NCF
        chunk = tl.where(wrap, chunk - NCF, chunk)
        row = tl.where(wrap, row + 1, row)
        at = tl.where(wrap, at + next_row, at)
        out = tl.where(wrap, out + (NC - NCF), out)
    if NC > NCF:
        for first_row in range(pid * W, B, tl.num_programs(0) * W):
            last = first_row + warp
            r = tl.minimum(last, B - 1)
            offs = NCF * CHUNK + inner
            x = tl.load(
                logits_ptr + r.to(tl.int64) * stride_b + offs * stride_v, mask=offs < V, other=float("-inf")
            )
            scale_r, lo_r = _row_scale_lo(r, temp_ptr, temp_scalar, lo_ptr, PER_ROW_TEMP, HAS_LO)
            _chunk_stats(
                x.to(tl.float32),
                r.to(tl.int64) * NC + NCF,
                last < B,
                a,
                lo_r,
                rec_ptr,
                c_ptr,
                scale_r,
                RUNS,
                HAS_LO,
            )


@triton.jit(do_not_specialize=["seed_scalar"])
def _sample_finish_kernel(
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
    """The finish step as its own kernel (LaunchConfig.fused False): one program per row."""
    _finish_row(
        tl.program_id(0),
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
        RUNS,
        RUN,
        BLOCK_NC,
        PER_ROW_TEMP,
        HAS_LO,
        PER_ROW_SEED,
        HAS_POS,
    )
