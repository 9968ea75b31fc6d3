"""The top-k/top-p threshold kernel against its PyTorch reference (CPU: Triton interpreter)."""

import pytest
import torch
from helpers import random_logits

from arpo_fast.kernels.sampling_ref import truncation_threshold
from arpo_fast.kernels.truncation import truncation_threshold_triton

# Rows with every entry -inf (or a NaN) make the interpreter's numpy compute -inf - -inf: expected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 300, 2500])
@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (20, 0.9), (1, 0.3), (None, 0.999)])
def test_threshold_kernel_matches_the_reference(dtype, V, top_k, top_p):
    """One k for all rows (top-k candidates) or a whole sorted row (top-p alone), odd sizes, bf16
    ties, greedy and tiny temperatures: the same threshold as the reference."""
    B = 5
    logits = random_logits(B, V, dtype, masked_row=1)  # masked entries in one row
    temps = torch.tensor([1.0, 0.7, 0.0, 1e-3, 2.5])
    want = truncation_threshold(logits, temps, top_k, top_p)
    got = truncation_threshold_triton(logits, temps, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == (B,)
    assert torch.equal(got, want)


def test_per_row_settings_and_scalar_temperature():
    B, V = 6, 1000
    logits = random_logits(B, V, masked_row=1)
    k = torch.tensor([0, 3, 1000, 10, -1, 1])
    p = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.2, 0.7])
    for temperature in (0.8, torch.full((B,), 0.8)):
        for top_k, top_p in ((k, p), (k, None), (None, p), (7, p), (k, 0.9)):
            want = truncation_threshold(logits, temperature, top_k, top_p)
            assert torch.equal(truncation_threshold_triton(logits, temperature, top_k, top_p), want)


def test_rows_with_nan_or_all_masked_match_the_reference():
    """Such rows are invalid in the sampler whatever the threshold; it must still be computed the
    same way, without touching the other rows."""
    logits = torch.randn(3, 50)
    logits[0, 7] = float("nan")
    logits[2] = float("-inf")
    want = truncation_threshold(logits, 1.0, None, 0.8)
    got = truncation_threshold_triton(logits, 1.0, None, 0.8)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    assert torch.isfinite(got[1])


def test_long_tail_of_tiny_entries_is_counted_in_float64():
    """Mass above each entry is summed in float64: with 100k entries of 1e-9 relative mass behind a
    few large ones, p = 0.9999 still lands at the right entry (the reference sums in float64 too)."""
    V = 100_000
    logits = torch.full((1, V), -20.7)  # exp(-20.7) ~ 1e-9
    logits[0, :3] = torch.tensor([0.0, -0.5, -1.0])
    logits[0, 3:] += torch.linspace(0, 1e-3, V - 3)
    for top_p in (0.9999, 0.99999):
        want = truncation_threshold(logits, 1.0, None, top_p)
        assert torch.equal(truncation_threshold_triton(logits, 1.0, None, top_p), want)


def test_empty_batch():
    out = truncation_threshold_triton(torch.empty(0, 10), 1.0, 3, 0.5)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (None, 0.95), (1000, None)])
def test_gpu_threshold_kernel_agrees_with_the_reference(top_k, top_p):
    """Full size on the GPU: the same threshold except where p * S lands within float rounding of a
    boundary (the exponentials round differently there)."""
    B, V = 64, 151936
    logits = (torch.randn(B, V, device="cuda") * 4).bfloat16()
    logits[::7, ::3] = float("-inf")
    temps = torch.rand(B, device="cuda") * 2
    want = truncation_threshold(logits, temps, top_k, top_p)
    got = truncation_threshold_triton(logits, temps, top_k, top_p)
    assert (got == want).float().mean() >= 0.95
