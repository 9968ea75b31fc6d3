"""Fused sampler: one read of the logits gives the sampled token, its log-prob and the entropy.

The usual path (softmax, multinomial, an entropy reduction, a gather) reads the logits four or more
times and draws one random number per vocabulary entry. Here no entry gets a random number. The
exact two-step scheme:

1. ``_sample_stats_kernel``, grid (B, tiles): each program reads one vocabulary tile of one row
   once and writes its max ``m`` (raw logit units), ``s = sum 2^d`` and ``w = sum 2^d * d`` with
   ``d = (x - m) * log2(e) / T``, and the sums of ``2^d`` over runs of 256 entries (a map of the
   tile, 1/64 of its size). Splitting the vocabulary keeps small batches spread over the GPU.
2. ``_sample_finish_kernel``, one program per row: merges the tile stats into log Z and the entropy
   ``H = ln S - ln 2 * W / S``, then inverts the CDF of the whole row with a single uniform
   ``u`` in [0, 1): ``u * S`` picks a tile by cumulative tile mass, a run inside it by cumulative
   run mass, and a token inside the run by cumulative mass within it (it re-reads those 256
   entries only).

The uniform has 53 bits (two 32-bit hashes of (seed, position, stream)), and the cumulative sums are
taken in float64, so tokens far below the top (12 nats and more) are drawn at their true rate: an
fp32 uniform would only resolve masses above about 6e-8, and fp32 Gumbel noise caps near 16 nats.
Constants such as log2(e) = 1.4426950408889634 and ln 2 = 0.6931471805599453 appear as literals in
the kernels.
The token is the inverse CDF of one uniform that depends only on (seed, position), so it does not
depend on the batch, on B, or on the tile size (the last only up to float rounding of the
cumulative sums: a uniform landing within about 1e-7 of a token boundary can move by one token).

Greedy rows (temperature <= 0) take the argmax (ties to the lowest index) and report log-prob and
entropy of the untempered distribution. Top-k/top-p take a second path: a per-row logit threshold
(``_truncation_threshold``, PyTorch, sorting) and then the same two kernels with entries below the
threshold treated as -inf.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton

_M32 = 0xFFFFFFFF

TensorOrFloat = torch.Tensor | float
TensorOrInt = torch.Tensor | int


class SampleOutput(NamedTuple):
    """What ``sample`` returns; every field has shape [B].

    tokens:   int64, the sampled token (-1 where ``valid`` is False).
    logprobs: float32, log-prob of the token under the distribution sampled from (tempered, and
              truncated and renormalised when top-k/top-p is set); NaN where ``valid`` is False.
    entropy:  float32, entropy in nats of that same distribution; NaN where ``valid`` is False.
    valid:    bool, False for rows with a NaN or +inf entry, or with every entry -inf.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    valid: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Counter-based uniforms, written identically in Triton and in PyTorch.
# All values stay in [0, 2^32) inside int64; a 32-bit multiply is split into 16-bit halves so no
# intermediate overflows int64 (wrap-around on overflow is not something to rely on in either).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _uniform53(seed, pos):
    """A float64 uniform in [0, 1) with 53 random bits, a function of (seed, position) only.

    Two 32-bit hashes (streams 1 and 2, computed side by side in a [2] block) of the words
    (stream, seed lo, seed hi, pos lo, pos hi), each word xor-ed in and followed by MurmurHash3's
    finaliser (a bijection on 32 bits with full avalanche). Written inline, without helper calls:
    Triton's interpreter pays milliseconds per nested jit call, and this runs once per row.
    """
    lane = tl.arange(0, 2)
    h = ((lane + 1).to(tl.int64) * 0x9E3779B9) & 0xFFFFFFFF
    for r in tl.static_range(5):
        if r == 0:
            word = 0
        elif r == 1:
            word = seed & 0xFFFFFFFF
        elif r == 2:
            word = (seed >> 32) & 0xFFFFFFFF
        elif r == 3:
            word = pos & 0xFFFFFFFF
        else:
            word = (pos >> 32) & 0xFFFFFFFF
        h = h ^ word
        h = h ^ (h >> 16)
        # h * 0x85EBCA6B mod 2^32, split in 16-bit halves so nothing overflows int64.
        h = (h * 0xCA6B + (((h * 0x85EB) & 0xFFFF) << 16)) & 0xFFFFFFFF
        h = h ^ (h >> 13)
        h = (h * 0xAE35 + (((h * 0xC2B2) & 0xFFFF) << 16)) & 0xFFFFFFFF
        h = h ^ (h >> 16)
    a = tl.sum(tl.where(lane == 0, h, 0), 0)
    b = tl.sum(tl.where(lane == 1, h, 0), 0)
    bits = (a >> 5) * 67108864 + (b >> 6)  # 27 + 26 bits
    return bits.to(tl.float64) * 1.1102230246251565e-16  # 2^-53


def _mul32_ref(h: torch.Tensor, c: int) -> torch.Tensor:
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32_ref(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32_ref(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32_ref(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _hash32_ref(seed: torch.Tensor, pos: torch.Tensor, stream: int) -> torch.Tensor:
    h = torch.full_like(seed, (stream * 0x9E3779B9) & _M32)
    for word in (0, seed & _M32, (seed >> 32) & _M32, pos & _M32, (pos >> 32) & _M32):
        h = _fmix32_ref(h ^ word)
    return h


def uniform53_ref(seed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The sampler's uniforms. seed, pos: int64 [B]. Returns float64 [B] in [0, 1)."""
    a = _hash32_ref(seed, pos, 1)
    b = _hash32_ref(seed, pos, 2)
    return ((a >> 5) * 67108864 + (b >> 6)).to(torch.float64) * 2.0**-53


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


# The kernels below are written out without small helper calls on purpose: Triton's interpreter,
# which runs the CPU tests, pays milliseconds per nested jit call per program.
# Temperature: scale = log2(e) / T, so p ~ 2^((x - m) * scale); greedy rows (T <= 0) use T = 1.
# Subtracting before scaling keeps (x - m) exact near the max even for |x| ~ 1e4 and T ~ 1e-3.


@triton.jit
def _sample_stats_kernel(logits_ptr, stride_b, stride_v, temp_ptr, temp_scalar, lo_ptr,
                         m_ptr, s_ptr, w_ptr, c_ptr, V, NT,
                         TILE: tl.constexpr, SUB: tl.constexpr,
                         PER_ROW_TEMP: tl.constexpr, HAS_LO: tl.constexpr):
    """Per-(row, tile) stats. Writes m (max, raw logit units), s = sum 2^d, w = sum 2^d * d,
    with d = (x - m) * log2(e) / T, into fp32 [B, NT] buffers, and the sums of 2^d over each
    run of SUB entries into fp32 [B, NT, TILE // SUB] (the finish step's map of the tile)."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    if PER_ROW_TEMP:
        t = tl.load(temp_ptr + row)
    else:
        t = temp_scalar
    scale = 1.4426950408889634 / tl.where(t > 0.0, t, 1.0)
    x = _load_span(logits_ptr, stride_b, stride_v, lo_ptr, row, tile * TILE, V, TILE, HAS_LO)
    m = tl.max(x, 0)
    # An all -inf tile gets s = w = 0 (not NaN from -inf - -inf); NaN or +inf entries make s NaN.
    d = (x - tl.where(m == float("-inf"), 0.0, m)) * scale
    e = tl.exp2(d)
    # max(d, -1000) turns 0 * -inf into 0 for masked entries without a branch (2^-1000 == 0).
    w = tl.sum(e * tl.maximum(d, -1000.0), 0)
    c = tl.sum(tl.reshape(e, (TILE // SUB, SUB)), 1)
    s = tl.sum(c, 0)
    out = row.to(tl.int64) * NT + tile
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, s)
    tl.store(w_ptr + out, w)
    tl.store(c_ptr + out * (TILE // SUB) + tl.arange(0, TILE // SUB), c)


@triton.jit(do_not_specialize=["seed_scalar"])  # a seed of 1 must not become a constexpr
def _sample_finish_kernel(logits_ptr, stride_b, stride_v, temp_ptr, temp_scalar, lo_ptr,
                          seed_ptr, seed_scalar, pos_ptr, m_ptr, s_ptr, w_ptr, c_ptr,
                          tok_ptr, logp_ptr, ent_ptr, valid_ptr, V, NT,
                          TILE: tl.constexpr, SUB: tl.constexpr, BLOCK_NT: tl.constexpr,
                          PER_ROW_TEMP: tl.constexpr, HAS_LO: tl.constexpr,
                          PER_ROW_SEED: tl.constexpr, HAS_POS: tl.constexpr):
    """Per row: merge the tile stats, draw the token, write token/log-prob/entropy/valid [B].
    A sampled token is found in three steps, each a float64 cumulative sum: the tile (from the
    tile masses), the run of SUB entries inside it (from the stats pass's run sums), and the entry
    inside that run (re-read: SUB entries of the logits). Greedy rows re-read the tile's argmax."""
    row = tl.program_id(0)
    if PER_ROW_TEMP:
        t = tl.load(temp_ptr + row)
    else:
        t = temp_scalar
    greedy = t <= 0.0
    scale = 1.4426950408889634 / tl.where(greedy, 1.0, t)

    # Merge: M = max m_t, tile mass S_t = s_t 2^delta_t with delta_t = (m_t - M) * scale <= 0,
    # S = sum S_t, W = sum 2^delta_t (w_t + delta_t s_t); H = ln S - ln 2 * W / S.
    t_idx = tl.arange(0, BLOCK_NT)
    t_ok = t_idx < NT
    base = row.to(tl.int64) * NT
    m_t = tl.load(m_ptr + base + t_idx, mask=t_ok, other=float("-inf"))
    s_t = tl.load(s_ptr + base + t_idx, mask=t_ok, other=0.0)
    w_t = tl.load(w_ptr + base + t_idx, mask=t_ok, other=0.0)
    big_m = tl.max(m_t, 0)
    delta = (m_t - tl.where(big_m == float("-inf"), 0.0, big_m)) * scale
    r_t = tl.exp2(delta)
    mass = s_t * r_t
    total = tl.sum(mass, 0)
    w_all = tl.sum(r_t * (w_t + tl.maximum(delta, -1000.0) * s_t), 0)
    valid = (total > 0.0) & (total < float("inf"))  # False for NaN too
    entropy = tl.log(total) - 0.6931471805599453 * w_all / total

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
    target = _uniform53(seed, pos) * tl.max(cum, 0)
    tile_s = tl.sum((cum <= target).to(tl.int32), 0)
    # Rounding can leave target at or past the last boundary: take the last tile with mass.
    tile_s = tl.minimum(tile_s, tl.max(tl.where(mass > 0.0, t_idx, -1), 0))
    sel = t_idx == tile_s
    frac = tl.sum(tl.where(sel, target - (cum - mass64), 0.0), 0) / tl.sum(tl.where(sel, mass64, 0.0), 0)
    tile_g = tl.min(tl.where(m_t == big_m, t_idx, BLOCK_NT), 0)  # first tile holding the max
    tile = tl.where(greedy, tile_g, tile_s)
    tile = tl.where(valid, tile, 0)

    m_tile = tl.sum(tl.where(t_idx == tile, m_t, 0.0), 0)
    if greedy:
        # The first entry of the first tile holding the max; its logit is that max.
        # (Names differ between the branches: the compiler wants a name's type the same in both.)
        x_all = _load_span(logits_ptr, stride_b, stride_v, lo_ptr, row, tile * TILE, V, TILE, HAS_LO)
        tok_in = tl.argmax(x_all, 0)
        x_tok = m_tile
    else:
        # The run of SUB entries holding the target, from the run sums of the stats pass.
        NC: tl.constexpr = TILE // SUB
        c_idx = tl.arange(0, NC)
        c = tl.load(c_ptr + (base + tile) * NC + c_idx).to(tl.float64)
        c_cum = tl.cumsum(c, 0)
        goal = frac * tl.sum(c, 0)
        run = tl.sum((c_cum <= goal).to(tl.int32), 0)
        run = tl.minimum(run, tl.max(tl.where(c > 0.0, c_idx, -1), 0))
        on_run = c_idx == run
        # Where the target falls inside the run, as a fraction of the run's mass: the entry is
        # then picked in proportion to its float64 share of the run, so a run sum's fp32 rounding
        # changes each entry's probability by a relative ~1e-7 at most (as for a tile's sum).
        before = tl.sum(tl.where(on_run, c_cum - c, 0.0), 0)
        frac_run = (goal - before) / tl.sum(tl.where(on_run, c, 0.0), 0)
        # Re-read that run; the same arithmetic as the stats pass gives the same masses.
        x = _load_span(logits_ptr, stride_b, stride_v, lo_ptr, row, tile * TILE + run * SUB, V,
                       SUB, HAS_LO)
        e = tl.exp2((x - tl.where(m_tile == float("-inf"), 0.0, m_tile)) * scale)
        idx = tl.arange(0, SUB)
        e64 = e.to(tl.float64)
        k = tl.sum((tl.cumsum(e64, 0) <= frac_run * tl.sum(e64, 0)).to(tl.int32), 0)
        # Rounding can put the target at or past the run's end: stay on its last entry with mass.
        k = tl.minimum(k, tl.max(tl.where(e > 0.0, idx, -1), 0))
        tok_in = run * SUB + k
        x_tok = tl.max(tl.where(idx == k, x, float("-inf")), 0)
    logp = (x_tok - big_m) * (scale * 0.6931471805599453) - tl.log(total)

    token = tl.where(valid, tile.to(tl.int64) * TILE + tok_in, -1)
    tl.store(tok_ptr + row, token)
    tl.store(logp_ptr + row, tl.where(valid, logp, float("nan")))
    tl.store(ent_ptr + row, tl.where(valid, entropy, float("nan")))
    tl.store(valid_ptr + row, valid)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """How the sampler's two kernels are launched. ``tile`` and ``sub`` (the finish step's run
    length, a power of two dividing the tile) enter the sampled arithmetic, and then only at
    float-rounding level; the warp counts are speed choices."""

    tile: int
    stats_warps: int = 4
    finish_warps: int = 2
    sub: int = 256


def _default_config(V: int) -> LaunchConfig:
    """A function of V only (never of B), so a row's token is the same in any batch."""
    return _config_for_tile(_tile_size(V))


def _config_for_tile(tile: int) -> LaunchConfig:
    if tile < 1024:  # tiny vocabularies: one warp is plenty
        return LaunchConfig(tile, 1, 1, min(tile, 256))
    # Timed on an H200 at V = 151936 (benchmarks/RESULTS.md): 8 warps in the streaming pass are
    # 10-19% slower; 1, 2 and 4 finish warps and runs of 128 or 256 are within 2%, runs of 512
    # 7% slower. The finish step needs 40 registers per thread at 2 warps (sm_90).
    return LaunchConfig(tile, 4, 2, 256)


def _tile_size(V: int) -> int:
    """Vocabulary tile of the streaming pass: a function of V only (never of B), so a row's
    arithmetic, and so its token, is the same in any batch. 4096 entries at 4 warps is 32 per
    thread (four 16-byte loads of bf16 in flight) and amortises the three block reductions per
    tile; V = 151936 gives 38 tiles, so even B = 1 spreads over 38 SMs. On an H200 at V = 151936
    4096 was the fastest tile measured: 2048 is up to 14% slower, 8192 10-15% slower and 16384
    four times slower (benchmarks/RESULTS.md)."""
    return 4096 if V >= 4096 else max(16, triton.next_power_of_2(V))


def _as_row_tensor(value, B: int, dtype: torch.dtype, device: torch.device):
    """(tensor [B] of dtype, None) for a per-row tensor, or (None, scalar) for a Python number."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        return value.to(device=device, dtype=dtype).contiguous(), None
    return None, value


def _launch(logits: torch.Tensor, temperature, seed, position, lo, tile: int | None,
            finish: bool = True, config: LaunchConfig | None = None) -> SampleOutput:
    """Run the two kernels on logits [B, V] (any strides); lo: fp32 [B] threshold or None.
    ``tile`` overrides the default config's tile; ``config`` replaces the default launch config
    (tests and tuning). ``finish=False`` runs the streaming pass alone (benchmarks time it
    separately); the outputs are then left unwritten."""
    if (logits.shape[1] - 1) * abs(logits.stride(1)) >= 2**31:
        logits = logits.contiguous()  # the kernels index columns in int32
    B, V = logits.shape
    dev = logits.device
    if config is None:
        config = _config_for_tile(tile) if tile else _default_config(V)
    tile, sub = config.tile, config.sub
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"the vocabulary tile must be a power of two >= 16, got {tile}")
    if sub < 1 or sub & (sub - 1) or sub > tile:
        raise ValueError(f"the run length must be a power of two <= the tile {tile}, got {sub}")
    nt = triton.cdiv(V, tile)
    temp_t, temp_s = _as_row_tensor(temperature, B, torch.float32, dev)
    seed_t, seed_s = _as_row_tensor(seed, B, torch.int64, dev)
    pos_t = None if position is None else _as_row_tensor(position, B, torch.int64, dev)[0]
    # One allocation: tile stats m, s, w [B, nt] each, then run sums c [B, nt, tile // sub].
    buf = torch.empty((3 + tile // sub) * B * nt, dtype=torch.float32, device=dev)
    m, s, w = buf[:3 * B * nt].view(3, B, nt).unbind(0)
    c = buf[3 * B * nt:]
    out = SampleOutput(torch.empty(B, dtype=torch.int64, device=dev),
                       torch.empty(B, dtype=torch.float32, device=dev),
                       torch.empty(B, dtype=torch.float32, device=dev),
                       torch.empty(B, dtype=torch.bool, device=dev))
    if B == 0:
        return out
    dummy = m  # stands in for absent optional pointers; never read
    temp_arg = temp_t if temp_t is not None else dummy
    temp_scalar = 0.0 if temp_t is not None else float(temp_s)
    lo_arg = lo if lo is not None else dummy
    _sample_stats_kernel[(B, nt)](
        logits, logits.stride(0), logits.stride(1), temp_arg, temp_scalar, lo_arg, m, s, w, c, V, nt,
        TILE=tile, SUB=sub, PER_ROW_TEMP=temp_t is not None, HAS_LO=lo is not None,
        num_warps=config.stats_warps)
    if not finish:
        return out
    _sample_finish_kernel[(B,)](
        logits, logits.stride(0), logits.stride(1), temp_arg, temp_scalar, lo_arg,
        seed_t if seed_t is not None else dummy, 0 if seed_t is not None else int(seed_s),
        pos_t if pos_t is not None else dummy, m, s, w, c, *out, V, nt,
        TILE=tile, SUB=sub, BLOCK_NT=max(16, triton.next_power_of_2(nt)),
        PER_ROW_TEMP=temp_t is not None, HAS_LO=lo is not None,
        PER_ROW_SEED=seed_t is not None, HAS_POS=pos_t is not None, num_warps=config.finish_warps)
    return out


# ----------------------------------------------------------------------------------------------
# Top-k / top-p threshold (second path, PyTorch)
# ----------------------------------------------------------------------------------------------


def _row_values(value, B: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-row tensor [B] of dtype from a scalar or a [B] (or 0-d) tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(B)
    return torch.full((B,), value, dtype=dtype, device=device)


def _seed_int64(seed):
    """Python int seeds wrap into int64, as int64 seed tensors hold them."""
    if isinstance(seed, torch.Tensor):
        return seed
    return (int(seed) + 2**63) % 2**64 - 2**63


def _truncation_threshold(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """Per-row logit threshold for top-k then top-p: entries below it are dropped.

    logits: [B, V] any float dtype. temperature: float or [B] (<= 0: greedy, judged at T = 1).
    top_k: int or int [B] (<= 0 or >= V: off). top_p: float or [B] (>= 1: off).
    Returns fp32 [B]. Ties at the threshold are all kept. No host syncs.
    """
    B, V = logits.shape
    dev = logits.device
    x = logits.float()
    if top_k is not None and not isinstance(top_k, torch.Tensor) and 0 < top_k < V:
        # One k for all rows: top-k candidates suffice, far cheaper than a full sort.
        cand = torch.topk(x, int(top_k), dim=1, sorted=True).values
    else:
        cand = torch.sort(x, dim=1, descending=True).values
    n = cand.shape[1]
    neg_inf = torch.full((B,), float("-inf"), device=dev)
    lo = neg_inf
    if top_k is not None:
        k = _row_values(top_k, B, torch.int64, dev)
        kth = cand.gather(1, (k.clamp(1, n) - 1)[:, None])[:, 0]
        lo = torch.where((k > 0) & (k < V), kth, neg_inf)
    if top_p is not None:
        p = _row_values(top_p, B, torch.float32, dev)
        t = _row_values(temperature, B, torch.float32, dev)
        t = torch.where(t > 0, t, torch.ones_like(t))
        top = cand[:, :1]
        z = torch.where(cand < lo[:, None], float("-inf"), (cand - top) / t[:, None])
        probs = torch.softmax(z, dim=1)
        before = torch.cumsum(probs.double(), dim=1) - probs.double()  # mass strictly above
        n_keep = (before < p[:, None].double()).sum(1).clamp(1, n)
        lo_p = cand.gather(1, (n_keep - 1)[:, None])[:, 0]
        lo = torch.where(p < 1, torch.maximum(lo, lo_p), lo)
    return lo.contiguous()


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_args(logits: torch.Tensor, **per_row) -> None:
    """Shapes and dtypes, checked without reading any device value (no host sync)."""
    _check_logits(logits)
    B = logits.shape[0]
    for name, value in per_row.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != (B,):
            raise ValueError(f"{name} must be a scalar or have shape [{B}], got {tuple(value.shape)}")
    if isinstance(per_row.get("temperature"), float) and math.isnan(per_row["temperature"]):
        raise ValueError("temperature is NaN")


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one vocabulary entry")


def _raise_if_invalid(out: SampleOutput) -> None:
    """Host sync: only with check=True."""
    bad = (~out.valid).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else "")
        raise ValueError(f"sample: {len(bad)} row(s) of logits have a NaN or +inf entry or are "
                         f"entirely -inf: rows {shown}")


def _sample_triton(logits, temperature=1.0, seed=0, position=None, top_k=None, top_p=None,
                   tile: int | None = None, config: LaunchConfig | None = None) -> SampleOutput:
    """The Triton path; ``tile`` or a whole ``config`` override the launch (tests, tuning)."""
    lo = None
    if top_k is not None or top_p is not None:
        lo = _truncation_threshold(logits, temperature, top_k, top_p)
    return _launch(logits, temperature, _seed_int64(seed), position, lo, tile, config=config)


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
            Either one takes the second path (a sort or top-k in PyTorch, then the kernels).
        check: raise a ValueError naming the invalid rows (a host sync).

    Returns:
        SampleOutput(tokens int64 [B], logprobs float32 [B], entropy float32 [B], valid bool [B]).
        Log-prob and entropy are of the distribution actually sampled from. Rows with a NaN or +inf
        entry, or all -inf, get valid False, token -1 and NaN log-prob and entropy.

    CUDA tensors run the Triton kernels; CPU tensors run ``sample_ref`` unless TRITON_INTERPRET=1.
    The default path (no top-k/top-p) makes no host syncs and is CUDA-graph capturable.
    """
    _check_args(logits, temperature=temperature, seed=seed, position=position, top_k=top_k, top_p=top_p)
    if use_triton(logits):
        out = _sample_triton(logits, temperature, seed, position, top_k, top_p)
    else:
        out = sample_ref(logits, temperature, seed, position, top_k, top_p)
    if check:
        _raise_if_invalid(out)
    return out


def _inverse_cdf_ref(mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative mass exceeds u * total: mass fp32 [B, V] (>= 0), u fp64 [B].
    Returns int64 [B]; never an index of zero mass (when rounding puts u * total at the very end,
    the last entry with mass)."""
    cum = torch.cumsum(mass.double(), dim=1)
    tok = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
    last = torch.searchsorted(cum, cum[:, -1:].contiguous(), right=False)[:, 0]
    return torch.minimum(tok, last)


def sample_ref(logits: torch.Tensor, temperature: TensorOrFloat = 1.0, seed: TensorOrInt = 0,
               position: torch.Tensor | None = None, top_k: TensorOrInt | None = None,
               top_p: TensorOrFloat | None = None, *, check: bool = False) -> SampleOutput:
    """Pure-PyTorch reference of ``sample``: same signature, same rule, same uniforms.

    In fp32 like the kernel: z = (x - max) / T, S = sum exp(z), log-prob = z_tok - log S and
    entropy = log S - sum exp(z) z / S. The token is the inverse CDF of the same 53-bit uniform over
    the fp32 masses accumulated in float64, so it equals the kernel's token except where the
    uniform lands within float rounding of a token boundary. This is also what ``sample`` runs on
    CPU tensors.
    """
    _check_args(logits, temperature=temperature, seed=seed, position=position, top_k=top_k, top_p=top_p)
    B, V = logits.shape
    dev = logits.device
    x = logits.float()
    if top_k is not None or top_p is not None:
        lo = _truncation_threshold(logits, temperature, top_k, top_p)
        x = torch.where(x < lo[:, None], float("-inf"), x)
    t = _row_values(temperature, B, torch.float32, dev)
    greedy = t <= 0
    t = torch.where(greedy, torch.ones_like(t), t)
    big_m = x.max(dim=1, keepdim=True).values
    z = (x - torch.where(big_m == float("-inf"), 0.0, big_m)) / t[:, None]
    mass = torch.exp(z)
    total = mass.sum(1)
    log_total = torch.log(total)
    # where(): 0 * -inf is NaN for masked entries; their contribution is 0.
    entropy = log_total - torch.where(mass > 0, mass * z, 0.0).sum(1) / total
    valid = (total > 0) & (total < float("inf"))  # False for NaN and +inf rows too

    u = uniform53_ref(_row_values(_seed_int64(seed), B, torch.int64, dev),
                      _row_values(0 if position is None else position, B, torch.int64, dev))
    tok = torch.where(greedy, torch.argmax(x, dim=1), _inverse_cdf_ref(mass, u))
    tok = torch.where(valid, tok, -1)
    logp = z.gather(1, tok.clamp(0, V - 1)[:, None])[:, 0] - log_total
    nan = torch.full_like(logp, float("nan"))
    out = SampleOutput(tok, torch.where(valid, logp, nan), torch.where(valid, entropy, nan), valid)
    if check:
        _raise_if_invalid(out)
    return out
