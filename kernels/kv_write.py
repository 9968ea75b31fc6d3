"""Rotary embedding of the new tokens' queries and keys, fused with the paged KV write.

Unfused, a layer's rotary embedding and cache write are about a dozen small kernels (slices, a
negation, a concatenation, multiplies and adds for q and k, then two index copies); in a decode step
of a small model those launches cost more than the math. ``_rotary_kv_write_kernel`` does all of it
in one launch, one program per token: rotate q (written to a new tensor) and k, then store k and v at
the token's slot of the paged cache.

The rotation is the ``rotate_half`` convention of Llama/Qwen in ``transformers``:
``x * cos + rotate_half(x) * sin`` with cos/sin of the full head dim (the model's rotary module makes
them, scaling included). The kernel computes in fp32 and rounds once; the reference follows
``transformers`` and rounds after each op in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import next_power_of_2, use_triton


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    sc_t,
    so_t,
    so_h,
    skc_blk,
    skc_tok,
    skc_h,
    svc_blk,
    svc_tok,
    svc_h,
    H: tl.constexpr,
    HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    t64 = t.to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    heads = tl.arange(0, BLOCK_H)
    c1 = tl.load(cos_ptr + t64 * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t64 * sc_t + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t64 * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t64 * sc_t + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    mask2 = dmask[None, :]

    # Queries: rotate into the output tensor.
    qmask = (heads < H)[:, None] & mask2
    q_base = q_ptr + t64 * sq_t + heads[:, None] * sq_h + d[None, :]
    x1 = tl.load(q_base, mask=qmask, other=0.0).to(tl.float32)
    x2 = tl.load(q_base + HALF, mask=qmask, other=0.0).to(tl.float32)
    o_base = q_out_ptr + t64 * so_t + heads[:, None] * so_h + d[None, :]
    ty = q_out_ptr.dtype.element_ty
    tl.store(o_base, (x1 * c1[None, :] - x2 * s1[None, :]).to(ty), mask=qmask)
    tl.store(o_base + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(ty), mask=qmask)

    # Keys (rotated) and values, straight into the token's cache slot.
    slot = tl.load(slot_ptr + t)
    block = slot // PAGE
    off = slot % PAGE
    kmask = (heads < HK)[:, None] & mask2
    k_base = k_ptr + t64 * sk_t + heads[:, None] * sk_h + d[None, :]
    x1 = tl.load(k_base, mask=kmask, other=0.0).to(tl.float32)
    x2 = tl.load(k_base + HALF, mask=kmask, other=0.0).to(tl.float32)
    kc = kc_ptr + block * skc_blk + off * skc_tok + heads[:, None] * skc_h + d[None, :]
    cty = kc_ptr.dtype.element_ty
    tl.store(kc, (x1 * c1[None, :] - x2 * s1[None, :]).to(cty), mask=kmask)
    tl.store(kc + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(cty), mask=kmask)
    v_base = v_ptr + t64 * sv_t + heads[:, None] * sv_h + d[None, :]
    vc = vc_ptr + block * svc_blk + off * svc_tok + heads[:, None] * svc_h + d[None, :]
    tl.store(vc, tl.load(v_base, mask=kmask, other=0.0).to(cty), mask=kmask)
    tl.store(vc + HALF, tl.load(v_base + HALF, mask=kmask, other=0.0).to(cty), mask=kmask)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_kv_write_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Reference of ``rotary_kv_write`` (same signature), op by op as ``transformers`` does it."""
    _check(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    c, s = cos[:, None, :], sin[:, None, :]
    q_rot = q * c + _rotate_half(q) * s
    k_rot = k * c + _rotate_half(k) * s
    _page, heads, D = k_cache.shape[1:]
    k_cache.view(-1, heads, D).index_copy_(0, slot_mapping, k_rot.to(k_cache.dtype))
    v_cache.view(-1, heads, D).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return q_rot


def _check(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    N, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != N or k.shape[2] != D or D % 2:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need [N, heads, D] "
            "with one N and one even D"
        )
    if cos.shape != (N, D) or sin.shape != (N, D):
        raise ValueError(
            f"cos and sin must be [N, D] = [{N}, {D}], got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not hold [*, *, {k.shape[1]}, {D}] entries")
    if slot_mapping.shape != (N,) or slot_mapping.dtype != torch.int64:
        raise ValueError(
            f"slot_mapping must be int64 [{N}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )


def rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k, store rotated k and v in the paged cache, return rotated q.

    Args:
        q: [N, heads, D]; k, v: [N, kv_heads, D] (any float dtype; D even; last dim contiguous).
        cos, sin: [N, D], the rotary module's output for the tokens' positions.
        k_cache, v_cache: [num_blocks, page, kv_heads, D] views (page a power of two), written in place.
        slot_mapping: int64 [N], each token's slot ``block * page + offset`` (distinct slots).

    Returns:
        q rotated, [N, heads, D] in q's dtype.
    """
    _check(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    if not use_triton(q):
        return rotary_kv_write_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    for t in (q, k, v, cos, sin, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("the last dim of every tensor must be contiguous")
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must share strides")
    out = torch.empty_like(q)
    if q.shape[0] > 0:
        _launch(q, k, v, cos, sin, out, k_cache, v_cache, slot_mapping)
    return out


def _launch(q, k, v, cos, sin, out, k_cache, v_cache, slot_mapping) -> None:
    """The kernel over the N tokens, one program each, on checked tensors."""
    N, H, D = q.shape
    HK = k.shape[1]
    page = k_cache.shape[1]
    half = D // 2
    _rotary_kv_write_kernel[(N,)](
        q,
        k,
        v,
        cos,
        sin,
        out,
        k_cache,
        v_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        out.stride(0),
        out.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        H=H,
        HK=HK,
        HALF=half,
        BLOCK_H=next_power_of_2(max(H, HK)),
        BLOCK_HALF=next_power_of_2(half),
        PAGE=page,
        num_warps=1 if H * D <= 2048 else 4,
    )
