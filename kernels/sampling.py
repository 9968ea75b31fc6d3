"""Fused sampler: one read of the logits gives the sampled token, its log-prob and the entropy.

The usual path (softmax, multinomial, an entropy reduction, a gather) reads the logits four or more
times and draws one random number per vocabulary entry. Here no entry gets a random number. The
exact two-step scheme:

1. The streaming pass, grid (chunk groups, B): each warp reads one chunk of 1024 entries of one row
   once and writes its max ``m`` (raw logit units), ``s = sum 2^d`` and ``w = sum 2^d * d`` with
   ``d = x * scale - r``, ``scale = log2(e) / T`` and the chunk's reference ``r = m * scale``, and
   the sums of ``2^d`` over its runs of 256 entries (the finish step's map of the chunk). A warp's
   reductions stay inside the warp.
2. The finish step, once per row: merges the chunk stats into log Z and the entropy
   ``H = ln S - ln 2 * W / S``, then inverts the CDF of the whole row with a single uniform
   ``u`` in [0, 1): ``u * S`` picks a chunk by cumulative chunk mass, a run inside it by cumulative
   run mass, and a token inside the run by cumulative mass within it (it re-reads those 256
   entries only). By default the last program of a row to finish its chunks does this (it counts
   arrivals in a per-row counter that it then resets), so the sampler is one kernel launch;
   ``LaunchConfig(fused=False)`` runs it as a second kernel instead.

``d`` is one fused multiply-add per entry. Its product ``x * scale`` is exact inside the FMA, so
``d`` is accurate to fp32 rounding even for logits of 1e4 at T = 1e-3 (where ``x * scale`` is
about 1.4e7); the reference ``r`` rounds, so the max entry has ``d = rho``, the rounding residual
of ``m * scale``, not 0. The finish step works relative to that entry (log-prob from
``ln e_tok - ln S``, entropy from ``ln S - ln e_max`` and ``W - rho S``), so a one-hot row still
gets log-prob and entropy exactly 0.

The uniform has 53 bits (``counter_rng``), and the cumulative sums are taken in float64, so
tokens far below the top (12 nats and more) are drawn at their true rate: an fp32 uniform would
only resolve masses above about 6e-8, and fp32 Gumbel noise caps near 16 nats. Constants such as
log2(e) = 1.4426950408889634 and ln 2 = 0.6931471805599453 appear as literals in the kernels.
The token is the inverse CDF of one uniform that depends only on (seed, position), so it does not
depend on the batch, on B, or on the launch (chunk and run sizes move it only through float
rounding of the cumulative sums: a uniform landing within about 1e-7 of a token boundary can move
by one token).

Greedy rows (temperature <= 0) take the argmax (ties to the lowest index) and report log-prob and
entropy of the untempered distribution. Top-k/top-p take a second path: a per-row logit threshold
(``truncation.py``: candidates from ``torch.topk`` or ``torch.sort``, then one kernel) and then the
same kernels with entries below the threshold treated as -inf.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._dispatch import cdiv, next_power_of_2, use_triton
from .counter_rng import uniform53
from .sampling_ref import (
    SampleOutput,
    TensorOrFloat,
    TensorOrInt,
    active_truncation,
    check_args,
    raise_if_invalid,
    sample_ref,
    seed_int64,
)
from .truncation import truncation_threshold_triton

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_span(logits_ptr, stride_b, stride_v, lo_ptr, row, start, V,
               N: tl.constexpr, HAS_LO: tl.constexpr):
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
def _chunk_stats(x, chunk, a, row, lo, rec_ptr, c_ptr, NC, scale,
                 RUNS: tl.constexpr, HAS_LO: tl.constexpr):
    """The stats of W chunks, one per warp: x fp32 [RUNS, W, G, I], chunk int [1, W, 1, 1].
    Writes each chunk's record (m, s, w, m) and its run sums (chunks past NC are not written)."""
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
    out = row.to(tl.int64) * NC + chunk
    ok = chunk < NC
    # One record (m, s, w, m) per chunk: with several warps per program, each store changes
    # the layout through shared memory, so one store for the three saves barriers.
    rec = tl.join(tl.join(m, tl.sum(c, 0, keep_dims=True)),
                  tl.join(tl.sum(wd, 0, keep_dims=True), m))
    field = tl.arange(0, 2)  # join puts its new dim last: rec[..., i, j] is field 2j + i
    rec_off = (out[:, :, :, :, None, None] * 4 + field[None, None, None, None, :, None]
               + field[None, None, None, None, None, :] * 2)
    tl.store(rec_ptr + rec_off, rec, mask=ok[:, :, :, :, None, None])
    tl.store(c_ptr + out * RUNS + a, c, mask=ok)


# Temperature: scale = log2(e) / T, so p ~ 2^(x * scale - r); greedy rows (T <= 0) use T = 1.
# Small helper calls are kept few: Triton's interpreter, which runs the CPU tests, pays
# milliseconds per nested jit call per program.


@triton.jit(do_not_specialize=["seed_scalar"])  # a seed of 1 must not become a constexpr
def _sample_kernel(logits_ptr, stride_b, stride_v, temp_ptr, temp_scalar, lo_ptr,
                   seed_ptr, seed_scalar, pos_ptr, rec_ptr, c_ptr, count_ptr,
                   tok_ptr, logp_ptr, ent_ptr, valid_ptr, V, NC,
                   RUNS: tl.constexpr, G: tl.constexpr, I: tl.constexpr, W: tl.constexpr,
                   LOOP: tl.constexpr, BLOCK_NC: tl.constexpr, PER_ROW_TEMP: tl.constexpr,
                   HAS_LO: tl.constexpr, PER_ROW_SEED: tl.constexpr, HAS_POS: tl.constexpr,
                   FUSED: tl.constexpr, STAGES: tl.constexpr):
    """The streaming pass over chunks [pid * W * LOOP, (pid + 1) * W * LOOP) of one row: W warps,
    each reading LOOP chunks. Writes each chunk's record (m, s, w, m) into fp32 [B, NC, 4] and
    its run sums into fp32 [B, NC, RUNS]. With FUSED, the last program of the row to get here
    also runs the finish step for it."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    if PER_ROW_TEMP:
        t = tl.load(temp_ptr + row)
    else:
        t = temp_scalar
    scale = 1.4426950408889634 / tl.where(t > 0.0, t, 1.0)

    # The chunk as [RUNS, W, G, I]: entry (a, w, g, i) is run a, entry g * I + i of the run, of
    # the chunk warp w reads. Triton puts the lanes on i and then on a (the registers on g), so a
    # run's sum, and every reduction over a chunk, stays inside one warp.
    RUN: tl.constexpr = G * I
    CHUNK: tl.constexpr = RUNS * RUN
    a = tl.arange(0, RUNS)[:, None, None, None]
    inner = a * RUN + tl.arange(0, G)[None, None, :, None] * I + tl.arange(0, I)[None, None, None, :]
    row_ptr = logits_ptr + row.to(tl.int64) * stride_b
    if HAS_LO:
        lo = tl.load(lo_ptr + row)
    else:
        lo = 0.0
    warp_chunk = tl.arange(0, W)[None, :, None, None]
    # Each warp reads LOOP chunks, one after another. Full chunks (all but a row's last ones) load
    # without masks, in a loop of their own: its address arithmetic is hoisted out of the loop, and
    # with STAGES > 1 Triton pipelines it (the next chunks are copied into shared memory while a
    # warp works on one).
    n_full = tl.minimum(tl.maximum(V // (W * CHUNK) - pid * LOOP, 0), LOOP)
    for k in tl.range(0, n_full, num_stages=STAGES):
        chunk = (pid * LOOP + k) * W + warp_chunk
        x = tl.load(row_ptr + (chunk * CHUNK + inner) * stride_v).to(tl.float32)
        _chunk_stats(x, chunk, a, row, lo, rec_ptr, c_ptr, NC, scale, RUNS, HAS_LO)
    for k in range(n_full, LOOP):
        chunk = (pid * LOOP + k) * W + warp_chunk
        offs = chunk * CHUNK + inner
        x = tl.load(row_ptr + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32)
        _chunk_stats(x, chunk, a, row, lo, rec_ptr, c_ptr, NC, scale, RUNS, HAS_LO)

    if FUSED:
        # Every warp's stores come before the release below; the acquire makes all the row's
        # stores visible to the last program, which reads them through L2 (cache_modifier .cg).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) - 1:
            tl.store(count_ptr + row, 0)  # ready for the next call
            _finish_row(row, logits_ptr, stride_b, stride_v, temp_ptr, temp_scalar, lo_ptr,
                        seed_ptr, seed_scalar, pos_ptr, rec_ptr, c_ptr,
                        tok_ptr, logp_ptr, ent_ptr, valid_ptr, V, NC, RUNS, RUN, BLOCK_NC,
                        PER_ROW_TEMP, HAS_LO, PER_ROW_SEED, HAS_POS)


@triton.jit(do_not_specialize=["seed_scalar"])
def _sample_finish_kernel(logits_ptr, stride_b, stride_v, temp_ptr, temp_scalar, lo_ptr,
                          seed_ptr, seed_scalar, pos_ptr, rec_ptr, c_ptr,
                          tok_ptr, logp_ptr, ent_ptr, valid_ptr, V, NC,
                          RUNS: tl.constexpr, RUN: tl.constexpr, BLOCK_NC: tl.constexpr,
                          PER_ROW_TEMP: tl.constexpr, HAS_LO: tl.constexpr,
                          PER_ROW_SEED: tl.constexpr, HAS_POS: tl.constexpr):
    """The finish step as its own kernel (LaunchConfig.fused False): one program per row."""
    _finish_row(tl.program_id(0), logits_ptr, stride_b, stride_v, temp_ptr, temp_scalar, lo_ptr,
                seed_ptr, seed_scalar, pos_ptr, rec_ptr, c_ptr,
                tok_ptr, logp_ptr, ent_ptr, valid_ptr, V, NC, RUNS, RUN, BLOCK_NC,
                PER_ROW_TEMP, HAS_LO, PER_ROW_SEED, HAS_POS)


@triton.jit
def _finish_row(row, logits_ptr, stride_b, stride_v, temp_ptr, temp_scalar, lo_ptr,
                seed_ptr, seed_scalar, pos_ptr, rec_ptr, c_ptr,
                tok_ptr, logp_ptr, ent_ptr, valid_ptr, V, NC,
                RUNS: tl.constexpr, RUN: tl.constexpr, BLOCK_NC: tl.constexpr,
                PER_ROW_TEMP: tl.constexpr, HAS_LO: tl.constexpr,
                PER_ROW_SEED: tl.constexpr, HAS_POS: tl.constexpr):
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

    # Merge, relative to R = r_t of the max chunk: chunk mass S_t = s_t 2^delta_t with
    # delta_t = r_t - R <= 0, S = sum S_t, W = sum 2^delta_t (w_t + delta_t s_t). The max entry
    # has d = rho (the residual of M * scale) and mass e_max = 2^rho, bit for bit as the streaming
    # pass made it; H = ln(S / e_max) - ln 2 * (W - rho S) / S is ln S - ln 2 * W / S taken
    # relative to that entry, and exactly 0 for a one-hot row (S == e_max, W == rho S).
    idx = tl.arange(0, BLOCK_NC)
    ok = idx < NC
    base = row.to(tl.int64) * NC
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
    valid = (total > 0.0) & (total < float("inf"))  # False for NaN too
    rho = tl.fma(m_ref, scale, -big_r)
    e_max = tl.exp2(rho)
    # fma(rho, S, 0) rounds rho * S once, as the streaming pass rounded e_max * rho into W; a plain
    # product could be fused with the subtraction, and ln S - ln e_max (not ln(S / e_max), whose
    # division is approximate) is exactly 0 when S == e_max.
    entropy = (tl.log(total) - tl.log(e_max)
               - 0.6931471805599453 * (w_all - tl.fma(rho, total, 0.0)) / total)

    # Inverse CDF over the whole row with one 53-bit uniform; cumulative sums in float64.
    if PER_ROW_SEED:
        seed = tl.load(seed_ptr + row).to(tl.int64)
    else:
        seed = seed_scalar.to(tl.int64)
    if HAS_POS:
        pos = tl.load(pos_ptr + row).to(tl.int64)
    else:
        pos = seed * 0
    mass64 = mass.to(tl.float64)
    cum = tl.cumsum(mass64, 0)
    target = uniform53(seed, pos) * tl.max(cum, 0)
    pick = tl.sum((cum <= target).to(tl.int32), 0)
    # Rounding can leave target at or past the last boundary: take the last chunk with mass.
    pick = tl.minimum(pick, tl.max(tl.where(mass > 0.0, idx, -1), 0))
    sel = idx == pick
    frac = tl.sum(tl.where(sel, target - (cum - mass64), 0.0), 0) / tl.sum(tl.where(sel, mass64, 0.0), 0)
    first_max = tl.min(tl.where(m_t == big_m, idx, BLOCK_NC), 0)
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
        # The run holding the target, from the run sums of the streaming pass.
        c_idx = tl.arange(0, RUNS)
        c = tl.load(c_ptr + (base + ch) * RUNS + c_idx, cache_modifier=".cg").to(tl.float64)
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
        x = _load_span(logits_ptr, stride_b, stride_v, lo_ptr, row, ch * CHUNK + run * RUN, V,
                       RUN, HAS_LO)
        e = tl.exp2(tl.fma(x, scale, -(tl.where(m_ch == float("-inf"), 0.0, m_ch) * scale)))
        e_idx = tl.arange(0, RUN)
        e64 = e.to(tl.float64)
        k = tl.sum((tl.cumsum(e64, 0) <= frac_run * tl.sum(e64, 0)).to(tl.int32), 0)
        # Rounding can put the target at or past the run's end: stay on its last entry with mass.
        k = tl.minimum(k, tl.max(tl.where(e > 0.0, e_idx, -1), 0))
        tok_in = run * RUN + k
        e_tok = tl.sum(tl.where(e_idx == k, e, 0.0), 0)
    # The token's mass relative to R is e_tok 2^delta_ch; taking the log of e_tok itself (not of
    # its d) lets e_tok's own rounding cancel against the same term inside S.
    delta_ch = tl.sum(tl.where(idx == ch, delta, 0.0), 0)
    logp = tl.log(e_tok) - tl.log(total) + 0.6931471805599453 * delta_ch

    token = tl.where(valid, ch.to(tl.int64) * CHUNK + tok_in, -1)
    tl.store(tok_ptr + row, token)
    tl.store(logp_ptr + row, tl.where(valid, logp, float("nan")))
    tl.store(ent_ptr + row, tl.where(valid, entropy, float("nan")))
    tl.store(valid_ptr + row, valid)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """How the sampler is launched.

    ``chunk`` (entries per record of the streaming pass) and ``run`` (entries per run sum, which
    the finish step re-reads; divides the chunk; None: min(chunk, 256)) are powers of two and
    enter the sampled arithmetic, then only at float-rounding level. The rest are speed choices:
    ``warps`` (warps per program of the streaming pass, each reading its own chunks), ``loop``
    (chunks each warp reads, one after another), ``stages`` (above 1: Triton pipelines a warp's
    full chunks, copying the next ones into shared memory while it works on one; needs ``loop``
    above 1 to matter), ``finish_warps`` (of the separate finish kernel) and ``fused`` (the last
    program of each row finishes it, so there is one kernel)."""

    chunk: int
    warps: int = 1
    finish_warps: int = 2
    run: int | None = None
    fused: bool = True
    loop: int = 1
    stages: int = 1


def _default_config(V: int) -> LaunchConfig:
    """A function of V only (never of B), so a row's token is the same in any batch.

    1024 entries per chunk, 32 per thread (four 16-byte loads of bf16 in flight), every reduction
    inside the warp; four warps per program (fewer if the row has fewer chunks), so a program
    covers 4096 entries as the measured tiles before it did and the grid keeps their shape. Not
    yet timed on a GPU. In an sm_90 build a program of this streaming pass runs about 390
    instructions per thread per 32 bf16 entries of a full chunk, setup included, with three block
    barriers (layout changes for the stores), against 484 and ten barriers for the 4096-entry
    tiles it replaced, whose pass was at 58-73% of the copy-bandwidth floor on an H200. One warp
    per program: about 370 and no barrier, but four times the programs. A warp that reads 4
    chunks in turn (``loop=4``) spends about 320 per chunk (the setup is paid once), or about 335
    with ``stages=2``, whose loads of the next chunk overlap the work on this one."""
    chunk = 1024 if V >= 1024 else max(16, next_power_of_2(V))
    warps = min(4, next_power_of_2(cdiv(V, chunk)))
    return LaunchConfig(chunk, warps, 2, None, True)


def _resolved(config: LaunchConfig) -> LaunchConfig:
    """The config with its run length filled in, once checked."""
    chunk = config.chunk
    run = min(chunk, 256) if config.run is None else config.run
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"the chunk must be a power of two >= 16, got {chunk}")
    if run < 1 or run & (run - 1) or run > chunk:
        raise ValueError(f"the run length must be a power of two <= the chunk {chunk}, got {run}")
    if config.warps < 1 or config.warps & (config.warps - 1):
        raise ValueError(f"warps must be a power of two, got {config.warps}")
    if config.loop < 1:
        raise ValueError(f"loop must be at least 1, got {config.loop}")
    if config.stages < 1:
        raise ValueError(f"stages must be at least 1, got {config.stages}")
    return config._replace(run=run)


# Per (device, stream): the fused kernel's per-row arrival counters, int32, zero between calls (the
# last program of a row resets its counter). A grown buffer never frees the old one: a captured
# CUDA graph may still point at it.
_COUNTERS: dict[tuple, list[torch.Tensor]] = {}


def _row_counters(device: torch.device, B: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    kept = _COUNTERS.setdefault((str(device), stream), [])
    if not kept or kept[-1].numel() < B:
        kept.append(torch.zeros(max(B, 1024), dtype=torch.int32, device=device))
    return kept[-1]


def _as_row_tensor(value, B: int, dtype: torch.dtype, device: torch.device):
    """(tensor [B] of dtype, None) for a per-row tensor, or (None, scalar) for a Python number."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        return value.to(device=device, dtype=dtype).contiguous(), None
    return None, value


_MAX_GRID_ROWS = 65535  # CUDA's limit on the grid's second dimension


def _launch(logits: torch.Tensor, temperature, seed, position, lo,
            config: LaunchConfig | None = None, finish: bool = True) -> SampleOutput:
    """Run the kernels on logits [B, V] (any strides); lo: fp32 [B] threshold or None.
    ``config`` replaces the default launch config (tests and tuning). ``finish=False`` runs the
    streaming pass alone (benchmarks time it separately); the outputs are then left unwritten."""
    if (logits.shape[1] - 1) * abs(logits.stride(1)) >= 2**31:
        logits = logits.contiguous()  # the kernels index columns in int32
    B, V = logits.shape
    dev = logits.device
    config = _resolved(config or _default_config(V))
    temp_t, temp_s = _as_row_tensor(temperature, B, torch.float32, dev)
    seed_t, seed_s = _as_row_tensor(seed, B, torch.int64, dev)
    pos_t = None if position is None else _as_row_tensor(position, B, torch.int64, dev)[0]
    if B > _MAX_GRID_ROWS:  # rows are independent: launch slices of them
        def rows(v, i):
            return v[i:i + _MAX_GRID_ROWS] if isinstance(v, torch.Tensor) else v

        parts = [_launch(rows(logits, i), rows(temp_s if temp_t is None else temp_t, i),
                         rows(seed_s if seed_t is None else seed_t, i), rows(pos_t, i), rows(lo, i),
                         config, finish) for i in range(0, B, _MAX_GRID_ROWS)]
        return SampleOutput(*(torch.cat(field) for field in zip(*parts)))

    chunk, run, W = config.chunk, config.run, config.warps
    nc = cdiv(V, chunk)
    runs = chunk // run
    # A run as [G, I]: I entries are 8 lanes x 16 bytes (64 bf16 or 32 fp32), so 8 lanes share a
    # run; this only shapes the layout, never the arithmetic.
    inner = min(run, 128 // logits.element_size())
    # One allocation: chunk records (m, s, w, m) [B, nc, 4], then run sums c [B, nc, runs].
    buf = torch.empty((4 + runs) * B * nc, dtype=torch.float32, device=dev)
    rec, c = buf[:4 * B * nc], buf[4 * B * nc:]
    out = SampleOutput(torch.empty(B, dtype=torch.int64, device=dev),
                       torch.empty(B, dtype=torch.float32, device=dev),
                       torch.empty(B, dtype=torch.float32, device=dev),
                       torch.empty(B, dtype=torch.bool, device=dev))
    if B == 0:
        return out
    fused = finish and config.fused
    dummy = rec  # stands in for absent optional pointers; never read
    args = (logits, logits.stride(0), logits.stride(1),
            temp_t if temp_t is not None else dummy, 0.0 if temp_t is not None else float(temp_s),
            lo if lo is not None else dummy,
            seed_t if seed_t is not None else dummy, 0 if seed_t is not None else int(seed_s),
            pos_t if pos_t is not None else dummy, rec, c)
    flags = dict(BLOCK_NC=max(16, next_power_of_2(nc)), PER_ROW_TEMP=temp_t is not None,
                 HAS_LO=lo is not None, PER_ROW_SEED=seed_t is not None, HAS_POS=pos_t is not None)
    # maxnreg: the finish step inside the fused kernel would take it to 79 registers on sm_90;
    # capped at 64 (no spills) one-warp programs fill the 32 blocks an SM can hold.
    _sample_kernel[(cdiv(nc, W * config.loop), B)](
        *args, _row_counters(dev, B) if fused else dummy, *out, V, nc,
        RUNS=runs, G=run // inner, I=inner, W=W, LOOP=config.loop, FUSED=fused,
        STAGES=config.stages, **flags, num_warps=W, maxnreg=64)
    if finish and not fused:
        _sample_finish_kernel[(B,)](*args, *out, V, nc, RUNS=runs, RUN=run, **flags,
                                    num_warps=config.finish_warps)
    return out


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _sample_triton(logits, temperature=1.0, seed=0, position=None, top_k=None, top_p=None,
                   config: LaunchConfig | None = None) -> SampleOutput:
    """The Triton path; ``config`` overrides the launch (tests, tuning)."""
    lo = None
    if top_k is not None or top_p is not None:
        lo = truncation_threshold_triton(logits, temperature, top_k, top_p)
    return _launch(logits, temperature, seed_int64(seed), position, lo, config)


def sample(logits: torch.Tensor, temperature: TensorOrFloat = 1.0, seed: TensorOrInt = 0,
           position: torch.Tensor | None = None, top_k: TensorOrInt | None = None,
           top_p: TensorOrFloat | None = None, *, check: bool = False) -> SampleOutput:
    """Sample one token per row, with its log-prob and the distribution's entropy.

    Args:
        logits: [B, V] float32, bfloat16 or float16; any strides (a view of a larger buffer works).
        temperature: float, or float32 [B]. 0 (or below) means greedy: the argmax, ties to the lowest
            index, with log-prob and entropy of the untempered (T = 1) distribution.
        seed: int, or int64 [B]. position: int64 [B], or None for zeros. The noise is a function of
            (seed, position) only: a row's token does not depend on its batch, and rows sharing
            (seed, position) share their uniform, so give each row its own pair for independent
            draws (a trajectory's seed and its token position). Pass tensors under CUDA-graph
            capture, or every replay reuses the captured numbers.
        top_k: None (off), int, or int64 [B]; k <= 0 or k >= V is off for that row.
        top_p: None (off), float, or float32 [B]; p >= 1 is off for that row. Applied after top-k.
            Either one takes the second path (a sort or top-k in PyTorch, then the kernels),
            unless it is a number that is off (top_k=-1, top_p=1.0): then nothing is sorted.
        check: raise a ValueError naming the invalid rows (a host sync).

    Returns:
        SampleOutput(tokens int64 [B], logprobs float32 [B], entropy float32 [B], valid bool [B]).
        Log-prob and entropy are of the distribution actually sampled from. Rows with a NaN or +inf
        entry, or all -inf, get valid False, token -1 and NaN log-prob and entropy.

    CUDA tensors run the Triton kernels; CPU tensors run ``sample_ref`` unless TRITON_INTERPRET=1.
    The default path (no top-k/top-p) makes no host syncs and is CUDA-graph capturable.
    """
    check_args(logits, temperature=temperature, seed=seed, position=position, top_k=top_k, top_p=top_p)
    top_k, top_p = active_truncation(top_k, top_p, logits.shape[1])
    if use_triton(logits):
        out = _sample_triton(logits, temperature, seed, position, top_k, top_p)
    else:
        out = sample_ref(logits, temperature, seed, position, top_k, top_p)
    if check:
        raise_if_invalid(out)
    return out
