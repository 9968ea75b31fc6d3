"""Paged decode and extend attention: Triton kernels (interpreted on the CPU) and the PyTorch
references against a float64 dense computation over the same tokens.

Tolerance rule (DESIGN.md): the kernel's error against float64 is at most 2x the reference's own
error in the same dtype, plus a small relative floor for fp32 where both are a few ulps.
"""

import pytest
import torch
from helpers import assert_rule

from arpo_fast.kernels import (
    paged_attention_decode,
    paged_attention_decode_ref,
    paged_attention_extend,
    paged_attention_extend_ref,
)
from arpo_fast.kernels.paged_attention import _decode_triton, _extend_triton

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _paged_inputs(lens, page, kv_heads, D, dtype, extra_blocks=3):
    """A shuffled pool holding sequences of the given lengths; the first two share their first page."""
    B = len(lens)
    width = max(-(-n // page) for n in lens)
    num_blocks = B * width + extra_blocks
    perm = torch.randperm(num_blocks)
    tables = perm[: B * width].view(B, width).to(torch.int32).contiguous()
    if B > 1:
        tables[1, 0] = tables[0, 0]  # a forked prefix: two tables point at one page
    k_cache = torch.randn(num_blocks, page, kv_heads, D).to(dtype)
    v_cache = torch.randn(num_blocks, page, kv_heads, D).to(dtype)
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def _dense_f64(q, k_cache, v_cache, tables, lens, n_new, scale):
    """Per-sequence float64 attention; q [N, H, D] rows for the last n_new[b] tokens of each sequence."""
    out, row = [], 0
    H = q.shape[1]
    for b, (ctx, n) in enumerate(zip(lens.tolist(), n_new)):
        page = k_cache.shape[1]
        idx = [tables[b, t // page].item() * page + t % page for t in range(ctx)]
        k = k_cache.reshape(-1, *k_cache.shape[2:])[idx].double()  # [ctx, Hk, D]
        v = v_cache.reshape(-1, *v_cache.shape[2:])[idx].double()
        G = H // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        qb = q[row : row + n].double()
        s = torch.einsum("mhd,thd->hmt", qb, k) * scale
        pos = torch.arange(ctx - n, ctx)
        s = s.masked_fill(torch.arange(ctx)[None, None, :] > pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hmt,thd->mhd", s.softmax(-1), v))
        row += n
    return torch.cat(out)


CASES = [  # lens, page, q_heads, kv_heads, head_dim
    ([5, 33, 1], 16, 4, 2, 16),
    ([70, 17], 8, 7, 1, 32),  # group of 7 query heads, Qwen-like
    ([3, 40, 9], 4, 2, 2, 24),  # head dim not a power of two: padded and masked
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,page,H,Hk,D", CASES)
def test_decode_matches_float64(lens, page, H, Hk, D, dtype):
    k_cache, v_cache, tables, ctx = _paged_inputs(lens, page, Hk, D, dtype)
    q = torch.randn(len(lens), H, D).to(dtype)
    scale = D**-0.5
    exact = _dense_f64(q, k_cache, v_cache, tables, ctx, [1] * len(lens), scale)
    ref = paged_attention_decode_ref(q, k_cache, v_cache, tables, ctx)
    ours = paged_attention_decode(q, k_cache, v_cache, tables, ctx)
    assert ours.dtype == dtype and ours.shape == q.shape
    assert_rule(ours, ref, exact, FLOOR[dtype])


@pytest.mark.parametrize("splits", [2, 5])
def test_decode_split_context_matches_unsplit(splits):
    k_cache, v_cache, tables, ctx = _paged_inputs([100, 3, 64], 16, 2, 32, torch.float32)
    q = torch.randn(3, 4, 32)
    one = _decode_triton(q, k_cache, v_cache, tables, ctx, 32**-0.5, 1)
    many = _decode_triton(q, k_cache, v_cache, tables, ctx, 32**-0.5, splits)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


EXTEND_CASES = [  # lens, new tokens per sequence, page, q_heads, kv_heads, head_dim
    ([20, 7, 50], [20, 3, 1], 8, 4, 2, 16),  # a prefill, a tool result, a decode
    ([90, 34], [70, 34], 16, 2, 1, 32),  # several query tiles
    ([11, 5], [4, 5], 4, 3, 3, 24),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,n_new,page,H,Hk,D", EXTEND_CASES)
def test_extend_matches_float64(lens, n_new, page, H, Hk, D, dtype):
    k_cache, v_cache, tables, ctx = _paged_inputs(lens, page, Hk, D, dtype)
    q = torch.randn(sum(n_new), H, D).to(dtype)
    cu = torch.tensor([0] + n_new, dtype=torch.int32).cumsum(0).to(torch.int32)
    exact = _dense_f64(q, k_cache, v_cache, tables, ctx, n_new, D**-0.5)
    ref = paged_attention_extend_ref(q, k_cache, v_cache, tables, ctx, cu, max(n_new))
    ours = paged_attention_extend(q, k_cache, v_cache, tables, ctx, cu, max(n_new))
    assert ours.dtype == dtype and ours.shape == q.shape
    assert_rule(ours, ref, exact, FLOOR[dtype])


def test_extend_with_one_token_each_equals_decode():
    k_cache, v_cache, tables, ctx = _paged_inputs([9, 30, 17], 8, 2, 16, torch.float32)
    q = torch.randn(3, 4, 16)
    cu = torch.arange(4, dtype=torch.int32)
    ext = _extend_triton(q, k_cache, v_cache, tables, ctx, cu, 1, 0.25)
    dec = _decode_triton(q, k_cache, v_cache, tables, ctx, 0.25, 1)
    torch.testing.assert_close(ext, dec, rtol=1e-5, atol=1e-5)


def test_padding_in_tables_is_never_read():
    """Entries of a table past a sequence's length may point anywhere, even at NaN pages."""
    k_cache, v_cache, tables, ctx = _paged_inputs([3, 40], 8, 2, 16, torch.float32)
    poison = tables[1, 3].item()
    k_cache[poison] = float("nan")
    v_cache[poison] = float("nan")
    tables[0, 1:] = poison  # sequence 0 uses only its first page
    q = torch.randn(2, 2, 16)
    tables[1, 3] = tables[1, 2]  # sequence 1 no longer holds the poisoned page
    out = paged_attention_decode(q, k_cache, v_cache, tables, ctx)
    assert torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    k_cache, v_cache, tables, ctx = _paged_inputs([5], 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention_decode(torch.randn(1, 3, 16), k_cache, v_cache, tables, ctx)
    with pytest.raises(ValueError, match="int32"):
        paged_attention_decode(torch.randn(1, 2, 16), k_cache, v_cache, tables.long(), ctx)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_attention_decode(torch.randn(1, 2, 16).double(), k_cache, v_cache, tables, ctx)
    with pytest.raises(ValueError, match="power of two"):
        bad = torch.randn(4, 6, 2, 16)
        paged_attention_decode(torch.randn(1, 2, 16), bad, bad, tables, ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_and_extend_qwen7b_layout(dtype):
    lens = [4096, 1, 777, 2048]
    k_cache, v_cache, tables, ctx = _paged_inputs(lens, 16, 4, 128, dtype)
    k_cache, v_cache, tables, ctx = k_cache.cuda(), v_cache.cuda(), tables.cuda(), ctx.cuda()
    q = torch.randn(4, 28, 128, device="cuda").to(dtype)
    exact = _dense_f64(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), ctx.cpu(), [1] * 4, 128**-0.5)
    ref = paged_attention_decode_ref(q, k_cache, v_cache, tables, ctx).cpu()
    for splits in (None, 1, 7):
        ours = paged_attention_decode(q, k_cache, v_cache, tables, ctx, num_splits=splits).cpu()
        assert_rule(ours, ref, exact, FLOOR[torch.bfloat16])
    n_new = [300, 1, 777, 5]
    q = torch.randn(sum(n_new), 28, 128, device="cuda").to(dtype)
    cu = torch.tensor([0] + n_new).cumsum(0).to(torch.int32).cuda()
    exact = _dense_f64(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), ctx.cpu(), n_new, 128**-0.5)
    ref = paged_attention_extend_ref(q, k_cache, v_cache, tables, ctx, cu, 777).cpu()
    ours = paged_attention_extend(q, k_cache, v_cache, tables, ctx, cu, 777).cpu()
    assert_rule(ours, ref, exact, FLOOR[torch.bfloat16])
