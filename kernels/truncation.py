"""Top-k/top-p threshold in one kernel launch per call.

``sample(..., top_k, top_p)`` drops the entries of each row below a per-row logit threshold. The
candidates (each row's top k, or the whole row sorted) come from ``torch.topk`` / ``torch.sort``;
then one program per row finds the threshold in two passes over its candidates: the mass
``S = sum exp((c - top) / T)`` of the entries top-k keeps, and the count of entries whose mass
strictly above them is below ``p * S`` (exponentials in fp32, sums in float64). The PyTorch reference,
``sampling_ref.truncation_threshold``, takes about thirty small tensor operations (and, for a
whole sorted row, several fp32 and float64 copies of the batch) for the same work.

The two agree except where ``p * S`` falls within float rounding of a cumulative boundary (on a
GPU the exponentials round differently; float64 sums in another order); the threshold then moves
by one candidate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import next_power_of_2, row_arg
from .sampling_ref import truncation_candidates


@triton.jit
def _kept_mass(base, start, offs, n, lo, top, t):
    """float64 masses exp((c - top) / T) of candidates [start, start + BLOCK), 0 below lo and past
    n. Both passes take their masses from here, so p * S and the running sums see the same values."""
    c = tl.load(base + start + offs, mask=start + offs < n, other=float("-inf")).to(tl.float32)
    return tl.where(c < lo, 0.0, tl.exp((c - top) / t)).to(tl.float64)


@triton.jit(do_not_specialize=["k_scalar"])  # a k of 1 must not become a constexpr
def _truncation_threshold_kernel(
    cand_ptr,
    stride_c,
    n,
    V,
    k_ptr,
    k_scalar,
    p_ptr,
    p_scalar,
    temp_ptr,
    temp_scalar,
    lo_ptr,
    HAS_K: tl.constexpr,
    PER_ROW_K: tl.constexpr,
    HAS_P: tl.constexpr,
    PER_ROW_P: tl.constexpr,
    PER_ROW_TEMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: candidates [n] sorted descending (any float dtype) -> the fp32 threshold."""
    row = tl.program_id(0)
    base = cand_ptr + row.to(tl.int64) * stride_c
    lo = float("-inf")
    if HAS_K:
        if PER_ROW_K:
            k = tl.load(k_ptr + row)
        else:
            k = k_scalar.to(tl.int64)
        kth = tl.load(base + tl.minimum(tl.maximum(k, 1), n) - 1).to(tl.float32)
        lo = tl.where((k > 0) & (k < V), kth, float("-inf"))
    if HAS_P:
        if PER_ROW_P:
            p = tl.load(p_ptr + row)
        else:
            p = p_scalar
        if PER_ROW_TEMP:
            t = tl.load(temp_ptr + row)
        else:
            t = temp_scalar
        t = tl.where(t > 0.0, t, 1.0)  # greedy rows are judged at T = 1
        top = tl.load(base).to(tl.float32)
        offs = tl.arange(0, BLOCK)
        # Pass 1: the mass top-k keeps (entries below lo, and -inf ones, weigh 0). Exponentials
        # in fp32, sums in float64 (as in the reference): a long tail of tiny entries does not
        # stall the sums, and p * S and the cumulative masses round alike.
        acc = tl.zeros([BLOCK], tl.float64)
        for start in range(0, n, BLOCK):
            acc += _kept_mass(base, start, offs, n, lo, top, t)
        goal = p.to(tl.float64) * tl.sum(acc, 0)
        # Pass 2: keep entry j while the mass strictly above it is below p * S.
        above = tl.zeros([1], tl.float64)
        keep = tl.zeros([1], tl.int32)
        for start in range(0, n, BLOCK):
            e = _kept_mass(base, start, offs, n, lo, top, t)
            cum = tl.cumsum(e, 0)
            keep += tl.sum(((above + cum - e < goal) & (start + offs < n)).to(tl.int32), 0)
            above += tl.sum(e, 0)
        n_keep = tl.minimum(tl.maximum(tl.sum(keep, 0), 1), n)
        lo_p = tl.load(base + n_keep - 1).to(tl.float32)
        lo = tl.where(p < 1.0, tl.maximum(lo, lo_p, propagate_nan=tl.PropagateNan.ALL), lo)
    tl.store(lo_ptr + row, lo)


def truncation_threshold_triton(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """The Triton path of ``sampling_ref.truncation_threshold``, with the same arguments:
    logits [B, V] (fp32, bf16 or fp16), temperature float or [B], top_k None, int or int [B],
    top_p None, float or [B]. Returns fp32 [B]. No host syncs."""
    B, V = logits.shape
    dev = logits.device
    cand = truncation_candidates(logits, top_k)
    lo = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return lo
    k_t, k_s = row_arg(top_k, B, torch.int64, dev) if top_k is not None else (None, 0)
    p_t, p_s = row_arg(top_p, B, torch.float32, dev) if top_p is not None else (None, 1.0)
    t_t, t_s = row_arg(temperature, B, torch.float32, dev)
    n = cand.shape[1]
    block = min(1024, max(16, next_power_of_2(n)))
    _truncation_threshold_kernel[(B,)](
        cand,
        cand.stride(0),
        n,
        V,
        lo if k_t is None else k_t,
        int(k_s or 0),
        lo if p_t is None else p_t,
        float(p_s or 0.0),
        lo if t_t is None else t_t,
        float(t_s or 0.0),
        lo,
        HAS_K=top_k is not None,
        PER_ROW_K=k_t is not None,
        HAS_P=top_p is not None,
        PER_ROW_P=p_t is not None,
        PER_ROW_TEMP=t_t is not None,
        BLOCK=block,
        num_warps=4 if block >= 512 else 1,
    )
    return lo
