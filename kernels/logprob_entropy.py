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

With ``vocab_limit`` (the tokenizer's size, where the LM head has rows past it: Qwen2.5 has 151,936
rows for 151,665 ids) the distribution covers the first ``vocab_limit`` rows only, as the sampler's
does: the blocks stop there, so the rows past it cost nothing, and their gradient is zero.

The two Triton kernels are in ``logprob_entropy_kernels.py``; the argument checks and the plain
[T, V] reference ``logprob_entropy_ref`` in ``logprob_entropy_ref.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch

from ._dispatch import cdiv, next_power_of_2, use_triton, vocab_in_use
from .logprob_entropy_kernels import _logprob_entropy_bwd_kernel, _logprob_entropy_fwd_kernel
from .logprob_entropy_ref import SUPPORTED_DTYPES, check_inputs, check_target_range, logprob_entropy_ref

__all__ = ["logprob_entropy", "logprob_entropy_ref", "default_chunk_size"]

# Bytes of one [T, chunk_size] logits block in the input dtype, used to pick the default chunk.
BLOCK_BYTES = 256 << 20
# Columns per block are a multiple of this (and at least this, unless V is smaller).
CHUNK_ALIGN = 256


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


def _logits_block(
    hidden: torch.Tensor, weight: torch.Tensor, v0: int, v1: int, buf: torch.Tensor
) -> torch.Tensor:
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
        block,
        block.stride(0),
        n,
        col0,
        tgt,
        m,
        s,
        w,
        zt,
        inv_temp,
        BLOCK=blk,
        num_warps=8 if blk >= 2048 else 4,
    )


def _grad_block_triton(block, col0, tgt, logz, ent, glp, gent, inv_temp):
    """See ``_logprob_entropy_bwd_kernel``; overwrites ``block`` [T, n] with dL/dlogits."""
    rows, n = block.shape
    if rows == 0:
        return
    blk = min(2048, max(16, next_power_of_2(n)))
    grid = (rows, cdiv(n, blk))
    _logprob_entropy_bwd_kernel[grid](
        block, block.stride(0), n, col0, tgt, logz, ent, glp, gent, inv_temp, BLOCK=blk, num_warps=4
    )


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


_BACKENDS = {True: (_fold_block_triton, _grad_block_triton), False: (_fold_block_torch, _grad_block_torch)}


# ---- the two passes ----


def _forward_stats(hidden, weight, tgt, inv_temp, chunk, triton_path, V):
    """logZ, entropy and the tempered target logit, each fp32 [T], one vocabulary block at a time,
    over the first V rows of ``weight``.

    A target outside [0, V) never matches a column, so its ``zt`` stays NaN: an unchecked bad
    target yields a NaN log-prob rather than a silently wrong one.
    """
    fold = _BACKENDS[triton_path][0]
    T = hidden.shape[0]
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


def _backward_grads(
    hidden, weight, tgt, logz, ent, glp, gent, inv_temp, chunk, triton_path, need_hidden, need_weight, V
):
    """grad_hidden [T, H] (hidden's dtype) and grad_weight (weight's shape and dtype; zero past
    row V, which the distribution does not cover), or None."""
    grad_block = _BACKENDS[triton_path][1]
    T = hidden.shape[0]
    acc = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    part = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    if need_weight:
        grad_weight[V:].zero_()
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
    def forward(ctx, hidden, weight, tgt, valid, inv_temp, chunk, triton_path, vocab):
        logz, ent, zt = _forward_stats(hidden, weight, tgt, inv_temp, chunk, triton_path, vocab)
        logprobs = torch.where(valid, zt - logz, 0.0)
        entropy = torch.where(valid, ent, 0.0)
        ctx.save_for_backward(hidden, weight, tgt, valid, logz, ent)
        ctx.inv_temp, ctx.chunk, ctx.triton_path, ctx.vocab = inv_temp, chunk, triton_path, vocab
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logprobs, g_entropy):
        hidden, weight, tgt, valid, logz, ent = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_hidden or need_weight):
            return None, None, None, None, None, None, None, None
        # Ignored rows get no gradient from either output.
        glp = _row_grad(g_logprobs, valid)
        gent = _row_grad(g_entropy, valid)
        grad_hidden, grad_weight = _backward_grads(
            hidden,
            weight,
            tgt,
            logz,
            ent,
            glp,
            gent,
            ctx.inv_temp,
            ctx.chunk,
            ctx.triton_path,
            need_hidden,
            need_weight,
            ctx.vocab,
        )
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _row_grad(g: Optional[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Upstream gradient as contiguous fp32 [T], zero where a row is ignored or unused."""
    if g is None:
        return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return torch.where(valid, g.float(), 0.0).contiguous()


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
    vocab_limit: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and entropy of each token's distribution, straight from the LM head.

    The distribution is ``softmax(hidden @ weight.T / temperature)``; the [T, V] logits are never
    held whole (see the module docstring). Differentiable in ``hidden`` and ``weight`` through
    both outputs, for any upstream gradients (the backward recomputes logits block by block).

    Args:
        hidden: [..., H] bf16, fp16 or fp32 - the policy model's last hidden states.
        weight: [V, H], same dtype and device as ``hidden`` - the LM head's weight.
        targets: [...] int64 (or int32) token ids in [0, V) (or [0, vocab_limit)), or
            ``ignore_index``.
        temperature: float > 0; the log-prob and entropy are those of the tempered distribution.
        chunk_size: vocabulary columns per block; the working set is one [T, chunk_size] block in
            the input dtype (plus fp32 [T, H] in backward). Default ``default_chunk_size``: about
            256 MiB per block.
        ignore_index: targets equal to it (padding) give log-prob 0, entropy 0 and no gradient.
        check_targets: validate that every target is in [0, V) or ``ignore_index`` and raise
            ValueError otherwise. Default: on CPU tensors yes (free), on CUDA no, since the check
            costs a host sync; an unchecked out-of-range target gives a NaN log-prob instead.
        vocab_limit: int >= 1, or None: the distribution covers ids below it only, renormalised
            over them, as ``sample(..., vocab_limit=...)`` samples it (pass len(tokenizer) for an
            LM head with rows past the tokenizer's vocabulary); rows of ``weight`` past it get
            zero gradient. None, or a limit >= V, is off.

    Returns:
        (logprobs, entropy): fp32, each shaped like ``targets``.

    Runs the Triton kernels on CUDA (or on the CPU under ``TRITON_INTERPRET=1``), otherwise the same
    blocked algorithm in PyTorch, so CPU memory stays bounded as well.
    """
    check_inputs(hidden, weight, targets, temperature, SUPPORTED_DTYPES)
    vocab = vocab_in_use(weight.shape[0], vocab_limit)
    if check_targets is None:
        check_targets = not targets.is_cuda
    if check_targets:
        check_target_range(targets, vocab, ignore_index)
    return _logprob_entropy(
        hidden, weight, targets, temperature, chunk_size, ignore_index, use_triton(hidden), vocab
    )


def _logprob_entropy(
    hidden, weight, targets, temperature, chunk_size, ignore_index, triton_path, vocab_limit=None
):
    """``logprob_entropy`` after its checks, with the backend chosen by the caller (tests use it)."""
    lead = targets.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(torch.int64)
    T, V = hidden2.shape[0], vocab_in_use(weight.shape[0], vocab_limit)
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(T, V, hidden.element_size())
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, -1).contiguous()
    logprobs, entropy = _LogprobEntropy.apply(
        hidden2, weight, tgt, valid, 1.0 / float(temperature), chunk, triton_path, V
    )
    return logprobs.view(lead), entropy.view(lead)
