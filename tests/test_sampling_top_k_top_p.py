"""Top-k / top-p in the sampler: the truncation threshold keeps the set a float64 computation
keeps, per-row settings, settings that keep everything skip the threshold, and the kernel's values
on truncated rows."""

import pytest
import torch
from helpers import assert_close64, kept, random_logits

from arpo_fast.kernels import sample, sample_ref, sampling, sampling_ref
from arpo_fast.kernels.sampling import _sample_triton
from arpo_fast.kernels.sampling_ref import truncation_threshold


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (20, 0.9), (1, None), (None, 1.0)])
def test_truncation_threshold_keeps_the_right_set(top_k, top_p, dtype):
    """The threshold selects and sorts in the logits' own dtype (bf16 here has many ties)."""
    B, V = 6, 300
    logits = random_logits(B, V, dtype)
    lo = truncation_threshold(logits, 0.8, top_k, top_p)
    assert torch.equal(logits >= lo[:, None], kept(logits, 0.8, top_k, top_p))


def test_truncation_per_row_tensors():
    B, V = 4, 100
    logits = random_logits(B, V)
    k = torch.tensor([0, 3, 100, 10])
    p = torch.tensor([1.0, 0.5, 0.9, 1.0])
    lo = truncation_threshold(logits, 1.0, k, p)
    for b in range(B):
        kb = int(k[b]) if 0 < k[b] < V else None
        want = kept(logits[b : b + 1], 1.0, kb, float(p[b]))[0]
        assert torch.equal(logits[b] >= lo[b], want)


def test_truncation_values_that_keep_everything_take_the_one_pass_path(monkeypatch):
    """top_k=-1/0/V and top_p=1.0 (common ways to say "off") sort nothing and give the
    untruncated result bit for bit, kernel and reference alike."""
    B, V = 3, 300
    logits = random_logits(B, V)
    temps, seeds, pos = torch.tensor([1.0, 0.5, 0.0]), torch.arange(B), torch.arange(B)
    want = [sample(logits, temps, seeds, pos), sample_ref(logits, temps, seeds, pos)]

    def no_threshold(*args):
        raise AssertionError("a truncation that keeps every entry computed a threshold")

    monkeypatch.setattr(sampling, "truncation_threshold_triton", no_threshold)
    monkeypatch.setattr(sampling_ref, "truncation_threshold", no_threshold)
    for top_k, top_p in ((-1, 1.0), (0, None), (V, None), (None, 1.0), (V + 5, 1.5)):
        got = [
            sample(logits, temps, seeds, pos, top_k, top_p),
            sample_ref(logits, temps, seeds, pos, top_k, top_p),
        ]
        for out, ref in zip(got, want):
            for a, b in zip(out, ref):
                assert torch.equal(a, b)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, None, 1.0), (None, 0.6, 0.7), (40, 0.9, 0.0)])
def test_kernel_top_k_top_p_values(top_k, top_p, temperature):
    B, V = 3, 400
    logits = random_logits(B, V, torch.bfloat16)
    out = _sample_triton(logits, temperature, 6, torch.arange(B), top_k, top_p)
    ref = sample_ref(logits, temperature, 6, torch.arange(B), top_k, top_p)
    keep = kept(logits, temperature, top_k, top_p)
    assert torch.equal(out.tokens, ref.tokens)
    assert keep.gather(1, out.tokens[:, None]).all()
    assert_close64(out, logits, temperature, keep)
    assert_close64(ref, logits, temperature, keep)
