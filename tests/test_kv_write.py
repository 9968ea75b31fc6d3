"""The fused rotary + paged KV write against its op-by-op reference and a float64 computation."""

import pytest
import torch
from helpers import assert_rule

from arpo_fast.kernels import rotary_kv_write, rotary_kv_write_ref

FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def _inputs(N, H, HK, D, page, dtype):
    q, k, v = (torch.randn(N, h, D).to(dtype) for h in (H, HK, HK))
    angles = torch.rand(N, D // 2) * 6
    emb = torch.cat([angles, angles], -1)
    cos, sin = (emb.cos() * 1.1).to(dtype), (emb.sin() * 1.1).to(dtype)  # 1.1: a rope attention scaling
    blocks = -(-N // page) + 3
    kv = torch.randn(2, blocks, page, HK, D).to(dtype)
    slots = torch.randperm(blocks * page)[:N]
    return q, k, v, cos, sin, kv, slots


def _exact(x, cos, sin):
    x, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,HK,D,page", [(5, 4, 2, 16, 4), (33, 7, 1, 24, 8), (1, 2, 2, 64, 16)])
def test_matches_reference_and_float64(N, H, HK, D, page, dtype):
    q, k, v, cos, sin, kv, slots = _inputs(N, H, HK, D, page, dtype)
    kv_ref = kv.clone()
    ours = rotary_kv_write(q, k, v, cos, sin, kv[0], kv[1], slots)
    ref = rotary_kv_write_ref(q, k, v, cos, sin, kv_ref[0], kv_ref[1], slots)
    for mine, theirs, exact in (
        (ours, ref, _exact(q, cos, sin)),
        (kv[0].flatten(0, 1)[slots], kv_ref[0].flatten(0, 1)[slots], _exact(k, cos, sin)),
    ):
        assert_rule(mine, theirs, exact, FLOOR[dtype])
    torch.testing.assert_close(kv[1].flatten(0, 1)[slots], v, rtol=0, atol=0)
    untouched = torch.ones(kv.shape[1] * kv.shape[2], dtype=torch.bool)
    untouched[slots] = False
    torch.testing.assert_close(kv.flatten(1, 2)[:, untouched], kv_ref.flatten(1, 2)[:, untouched])


def test_bad_shapes_raise():
    q, k, v, cos, sin, kv, slots = _inputs(4, 2, 2, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="int64"):
        rotary_kv_write(q, k, v, cos, sin, kv[0], kv[1], slots.int())
    with pytest.raises(ValueError, match="cos and sin"):
        rotary_kv_write(q, k, v, cos[:3], sin[:3], kv[0], kv[1], slots)
    with pytest.raises(ValueError, match="caches"):
        rotary_kv_write(q, k, v, cos, sin, kv[0, :, :, :1], kv[1, :, :, :1], slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype):
    q, k, v, cos, sin, kv, slots = (t.cuda() for t in _inputs(300, 14, 2, 64, 16, dtype))
    kv_ref = kv.clone()
    ours = rotary_kv_write(q, k, v, cos, sin, kv[0], kv[1], slots)
    ref = rotary_kv_write_ref(q, k, v, cos, sin, kv_ref[0], kv_ref[1], slots)
    exact = _exact(q.cpu(), cos.cpu(), sin.cpu())
    assert_rule(ours.cpu(), ref.cpu(), exact, FLOOR.get(dtype, 1e-3))
    torch.testing.assert_close(kv[1], kv_ref[1], rtol=0, atol=0)
