"""Per-token log-probs and entropies from hidden states and the LM head, never holding [T, V].

The policy loss of RL training needs, for every token, ``log p(target)`` and the entropy of the
tempered distribution ``softmax(hidden @ weight.T / temperature)``. Materialising the logits costs
T x V (16k tokens x 152k vocabulary: 5 GB in bf16, 10 GB per fp32 copy, and autograd keeps several).

Here the vocabulary is cut into blocks of ``chunk_size`` columns. For each block the logits
``hidden @ weight[v0:v1].T`` come from one cuBLAS matmul (input dtype, fp32 accumulation) into a
reused [T, chunk_size] buffer, and a Triton kernel folds them into per-token running statistics in
fp32: the max m, s = sum exp(z - m) and w = sum exp(z - m) * (z - m), with z = logit / temperature.
Split-vocabulary merging of (m, s, w) is exact, so at the end logZ = m + log s, the entropy is
H = log s - w / s (the shifted w avoids the cancellation of logZ - E[z]) and the log-prob is
z_target - logZ. Nothing [T, V]-sized is saved for backward: the backward recomputes each block of
logits, a second kernel turns it in place into dL/dlogits, and two matmuls consume it:
``grad_weight[v0:v1] = dlogits.T @ hidden`` (written once, so rounded once in bf16) and
``grad_hidden += dlogits @ weight[v0:v1]`` (accumulated in fp32, only [T, H]).

Why blocks of vocabulary rather than of tokens: a token-chunked backward must accumulate
``grad_weight`` across chunks, which needs an fp32 [V, H] accumulator (2.2 GB for Qwen2.5-7B's
head) or repeated bf16 rounding. Blocking the vocabulary makes the accumulator [T, H] instead.
The default ``chunk_size`` keeps the block at about 256 MiB (see ``default_chunk_size``).

Gradient of the two outputs with respect to the tempered logits z (p = softmax(z), t the target):
    d logp_t / d z_j = 1[j = t] - p_j
    d H / d z_j      = -p_j (log p_j + H)
and d/d logit = (1 / temperature) d/dz.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from ._dispatch import cdiv, next_power_of_2, use_triton

__all__ = ["logprob_entropy", "logprob_entropy_ref", "default_chunk_size"]

# Bytes of one [T, chunk_size] logits block in the input dtype, used to pick the default chunk.
BLOCK_BYTES = 256 << 20
# Columns per block are a multiple of this (and at least this, unless V is smaller).
CHUNK_ALIGN = 256
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _logprob_entropy_fwd_kernel(
    logits_ptr, stride_row, n_cols, col0, tgt_ptr, m_ptr, s_ptr, w_ptr, zt_ptr, inv_temp,
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
    logits_ptr, stride_row, n_cols, col0, tgt_ptr, logz_ptr, ent_ptr, glp_ptr, gent_ptr, inv_temp,
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


def default_chunk_size(num_tokens: int, vocab: int, itemsize: int) -> int:
    """Vocabulary columns per block so that a [num_tokens, chunk] block is about ``BLOCK_BYTES``.

    A multiple of ``CHUNK_ALIGN`` (at least that, so a huge ``num_tokens`` can exceed the budget:
    the block is then num_tokens x 256 entries) and at most ``vocab``. Qwen2.5-7B's head at
    T = 16384 in bf16 gets 8192 columns: 19 blocks of 256 MiB.
    """
    cols = BLOCK_BYTES // max(1, itemsize * max(1, num_tokens))
    cols = max(CHUNK_ALIGN, cols // CHUNK_ALIGN * CHUNK_ALIGN)
    return max(1, min(vocab, cols))


def _vocab_blocks(vocab: int, chunk: int) -> Iterator[tuple[int, int]]:
    for v0 in range(0, vocab, chunk):
        yield v0, min(vocab, v0 + chunk)


def _logits_block(hidden: torch.Tensor, weight: torch.Tensor, v0: int, v1: int,
                  buf: torch.Tensor) -> torch.Tensor:
    """Logits of vocabulary entries [v0, v1): [T, v1 - v0] in the input dtype, inside ``buf``.

    ``buf`` is a flat workspace of at least T * chunk elements, reused by every block so the
    allocator never holds two blocks.
    """
    out = buf[: hidden.shape[0] * (v1 - v0)].view(hidden.shape[0], v1 - v0)
    return torch.matmul(hidden, weight[v0:v1].t(), out=out)


# ---- per-block statistics and gradients: a Triton and a PyTorch implementation of each ----

def _fold_block_triton(block, col0, tgt, m, s, w, zt, inv_temp):
    """See ``_logprob_entropy_fwd_kernel``; ``block`` is a contiguous [T, n] logits block."""
    rows, n = block.shape
    if rows == 0:
        return
    blk = min(4096, max(16, next_power_of_2(n)))
    _logprob_entropy_fwd_kernel[(rows,)](
        block, block.stride(0), n, col0, tgt, m, s, w, zt, inv_temp,
        BLOCK=blk, num_warps=8 if blk >= 2048 else 4)


def _grad_block_triton(block, col0, tgt, logz, ent, glp, gent, inv_temp):
    """See ``_logprob_entropy_bwd_kernel``; overwrites ``block`` [T, n] with dL/dlogits."""
    rows, n = block.shape
    if rows == 0:
        return
    blk = min(2048, max(16, next_power_of_2(n)))
    grid = (rows, cdiv(n, blk))
    _logprob_entropy_bwd_kernel[grid](
        block, block.stride(0), n, col0, tgt, logz, ent, glp, gent, inv_temp,
        BLOCK=blk, num_warps=4)


def _fold_block_torch(block, col0, tgt, m, s, w, zt, inv_temp):
    """The same fold as the forward kernel in PyTorch (CPU path); updates m, s, w, zt in place."""
    z = block.float() * inv_temp
    m_new = torch.maximum(m, z.amax(dim=1))
    had = s > 0
    alpha = torch.where(had, torch.exp(m - m_new), 0.0)
    w_old = alpha * (w + torch.where(had, m - m_new, 0.0) * s)
    live = z > float("-inf")
    d = torch.where(live, z - m_new[:, None], 0.0)
    e = torch.where(live, torch.exp(d), 0.0)
    s.copy_(alpha * s + e.sum(dim=1))
    w.copy_(w_old + (e * d).sum(dim=1))
    m.copy_(m_new)
    n = block.shape[1]
    local = tgt - col0
    hit = (local >= 0) & (local < n)
    picked = z.gather(1, local.clamp(0, max(n - 1, 0))[:, None]).squeeze(1)
    zt.copy_(torch.where(hit, picked, zt))


def _grad_block_torch(block, col0, tgt, logz, ent, glp, gent, inv_temp):
    """The same dL/dlogits as the backward kernel in PyTorch (CPU path), written into ``block``."""
    logp = block.float() * inv_temp - logz[:, None]
    p = torch.exp(logp)
    plogp = torch.where(p > 0, p * (logp + ent[:, None]), 0.0)
    d = -glp[:, None] * p - gent[:, None] * plogp
    cols = torch.arange(col0, col0 + block.shape[1], device=block.device)
    d = torch.where(cols[None, :] == tgt[:, None], d + glp[:, None], d) * inv_temp
    block.copy_(d)


_BACKENDS = {True: (_fold_block_triton, _grad_block_triton),
             False: (_fold_block_torch, _grad_block_torch)}


# ---- the two passes ----

def _forward_stats(hidden, weight, tgt, inv_temp, chunk, triton_path):
    """logZ, entropy and the tempered target logit, each fp32 [T], one vocabulary block at a time.

    A target outside [0, V) never matches a column, so its ``zt`` stays NaN: an unchecked bad
    target yields a NaN log-prob rather than a silently wrong one.
    """
    fold = _BACKENDS[triton_path][0]
    T, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.full((T,), float("-inf"), **f32)
    s, w = torch.zeros(T, **f32), torch.zeros(T, **f32)
    zt = torch.full((T,), float("nan"), **f32)
    buf = torch.empty(T * min(chunk, V), dtype=hidden.dtype, device=hidden.device)
    for v0, v1 in _vocab_blocks(V, chunk):
        fold(_logits_block(hidden, weight, v0, v1, buf), v0, tgt, m, s, w, zt, inv_temp)
    log_s = torch.log(s)
    logz = m + log_s
    # An all -inf row (impossible for matmul logits) has s = 0: keep it NaN-free, entropy 0.
    ent = torch.where(s > 0, log_s - w / s, 0.0)
    return logz, ent, zt


def _backward_grads(hidden, weight, tgt, logz, ent, glp, gent, inv_temp, chunk, triton_path,
                    need_hidden, need_weight):
    """grad_hidden [T, H] (hidden's dtype) and grad_weight [V, H] (weight's dtype), or None."""
    grad_block = _BACKENDS[triton_path][1]
    T, V = hidden.shape[0], weight.shape[0]
    acc = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    part = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    buf = torch.empty(T * min(chunk, V), dtype=hidden.dtype, device=hidden.device)
    for v0, v1 in _vocab_blocks(V, chunk):
        block = _logits_block(hidden, weight, v0, v1, buf)
        grad_block(block, v0, tgt, logz, ent, glp, gent, inv_temp)
        if need_weight:
            # Each block owns its rows of grad_weight: one matmul, one rounding, no accumulator.
            torch.matmul(block.t(), hidden, out=grad_weight[v0:v1])
        if need_hidden:
            # fp32 accumulation over blocks; each block's product is rounded once to the input
            # dtype (PyTorch has no portable mixed-dtype addmm).
            acc.add_(torch.matmul(block, weight[v0:v1], out=part))
    del buf, part  # before the final cast, which briefly holds acc and its copy
    grad_hidden = acc.to(hidden.dtype) if need_hidden else None
    return grad_hidden, grad_weight


class _LogprobEntropy(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs and fp32 [T] row statistics, recomputes logits."""

    @staticmethod
    def forward(ctx, hidden, weight, tgt, valid, inv_temp, chunk, triton_path):
        logz, ent, zt = _forward_stats(hidden, weight, tgt, inv_temp, chunk, triton_path)
        logprobs = torch.where(valid, zt - logz, 0.0)
        entropy = torch.where(valid, ent, 0.0)
        ctx.save_for_backward(hidden, weight, tgt, valid, logz, ent)
        ctx.inv_temp, ctx.chunk, ctx.triton_path = inv_temp, chunk, triton_path
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logprobs, g_entropy):
        hidden, weight, tgt, valid, logz, ent = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_hidden or need_weight):
            return None, None, None, None, None, None, None
        # Ignored rows get no gradient from either output.
        glp = _row_grad(g_logprobs, valid)
        gent = _row_grad(g_entropy, valid)
        grad_hidden, grad_weight = _backward_grads(
            hidden, weight, tgt, logz, ent, glp, gent, ctx.inv_temp, ctx.chunk, ctx.triton_path,
            need_hidden, need_weight)
        return grad_hidden, grad_weight, None, None, None, None, None


def _row_grad(g: Optional[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Upstream gradient as contiguous fp32 [T], zero where a row is ignored or unused."""
    if g is None:
        return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return torch.where(valid, g.float(), 0.0).contiguous()


# ---- input checks ----

def _check_inputs(hidden, weight, targets, temperature, dtypes) -> None:
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"hidden must be [..., H] and weight [V, H]; got hidden {tuple(hidden.shape)}"
                         f" and weight {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden is {tuple(hidden.shape)} but weight is "
                         f"{tuple(weight.shape)} (expected weight [V, {hidden.shape[-1]}])")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its "
                         f"last dim), got {tuple(targets.shape)}")
    if hidden.dtype not in dtypes or weight.dtype != hidden.dtype:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"hidden and weight must share one dtype among {names}; got hidden "
                        f"{hidden.dtype} and weight {weight.dtype} (cast one, e.g. "
                        f"weight.to(hidden.dtype), outside the call so autograd sees the cast)")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32) token ids, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device; got {hidden.device}, "
                         f"{weight.device} and {targets.device}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError naming the first target outside [0, vocab) that is not ``ignore_index``."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        pos = int(bad.flatten().nonzero()[0])
        raise ValueError(f"target {int(targets.flatten()[pos])} at flat position {pos} is outside "
                         f"the vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})")


# ---- public functions ----

def logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    check_targets: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and entropy of each token's distribution, straight from the LM head.

    The distribution is ``softmax(hidden @ weight.T / temperature)``; the [T, V] logits are never
    held whole (see the module docstring). Differentiable in ``hidden`` and ``weight`` through
    both outputs, for any upstream gradients (the backward recomputes logits block by block).

    Args:
        hidden: [..., H] bf16, fp16 or fp32 - the policy model's last hidden states.
        weight: [V, H], same dtype and device as ``hidden`` - the LM head's weight.
        targets: [...] int64 (or int32) token ids in [0, V), or ``ignore_index``.
        temperature: float > 0; the log-prob and entropy are those of the tempered distribution.
        chunk_size: vocabulary columns per block; the working set is one [T, chunk_size] block in
            the input dtype (plus fp32 [T, H] in backward). Default ``default_chunk_size``: about
            256 MiB per block.
        ignore_index: targets equal to it (padding) give log-prob 0, entropy 0 and no gradient.
        check_targets: validate that every target is in [0, V) or ``ignore_index`` and raise
            ValueError otherwise. Default: on CPU tensors yes (free), on CUDA no, since the check
            costs a host sync; an unchecked out-of-range target gives a NaN log-prob instead.

    Returns:
        (logprobs, entropy): fp32, each shaped like ``targets``.

    Runs the Triton kernels on CUDA (or on the CPU under ``TRITON_INTERPRET=1``), otherwise the same
    blocked algorithm in PyTorch, so CPU memory stays bounded as well.
    """
    _check_inputs(hidden, weight, targets, temperature, SUPPORTED_DTYPES)
    if check_targets is None:
        check_targets = not targets.is_cuda
    if check_targets:
        _check_targets(targets, weight.shape[0], ignore_index)
    return _logprob_entropy(hidden, weight, targets, temperature, chunk_size, ignore_index,
                            use_triton(hidden))


def _logprob_entropy(hidden, weight, targets, temperature, chunk_size, ignore_index, triton_path):
    """``logprob_entropy`` after its checks, with the backend chosen by the caller (tests use it)."""
    lead = targets.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(torch.int64)
    T, V = hidden2.shape[0], weight.shape[0]
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(T, V, hidden.element_size())
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, -1).contiguous()
    logprobs, entropy = _LogprobEntropy.apply(
        hidden2, weight, tgt, valid, 1.0 / float(temperature), chunk, triton_path)
    return logprobs.view(lead), entropy.view(lead)


def logprob_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    check_targets: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch computation: full [T, V] logits, fp32 log_softmax, gather, entropy.

    Same arguments and results as ``logprob_entropy`` (``chunk_size`` is accepted and ignored);
    also takes fp64 inputs, which then stay fp64 throughout (the test suite's exact reference).
    """
    _check_inputs(hidden, weight, targets, temperature, SUPPORTED_DTYPES + (torch.float64,))
    if check_targets is None or check_targets:
        _check_targets(targets, weight.shape[0], ignore_index)
    logits = hidden @ weight.t()
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero)
