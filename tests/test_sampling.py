"""The fused sampler's values against float64 and its tokens against ``sample_ref``: odd vocabulary
sizes and dtypes, extreme temperatures and masked entries, strided views, greedy rows, and any rows
(hypothesis) on the reference.

On the CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest), which costs about
0.1 s per row, so kernel cases use a few rows. Log-prob and entropy are checked against a float64
computation within ``helpers.RTOL * |x64| + helpers.ATOL`` (``helpers.assert_close64``).

The other sampler tests: ``test_sampling_errors`` (invalid rows, bad arguments), ``test_sampling_seeds``
(batch invariance, seeds), ``test_sampling_launch`` (launch configurations),
``test_sampling_distribution`` (uniforms and goodness of fit), ``test_sampling_top_k_top_p``.
"""

import math

import pytest
import torch
from helpers import assert_close64, random_logits, sampler_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from arpo_fast.kernels import SampleOutput, sample, sample_ref
from arpo_fast.kernels.sampling import LaunchConfig, _sample_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------------------
# Kernel (interpreted on the CPU): values against float64, tokens against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [1, 7, 1000, 32001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_float64_and_reference(V, dtype):
    B = 2 if V > 10000 else 3
    logits = random_logits(B, V, dtype)
    temps = torch.tensor([1.0, 0.7, 1.6])[:B]
    seeds = torch.arange(B) * 7919 + 11
    pos = torch.arange(B) + 100
    out = _sample_triton(logits, temps, seeds, pos)
    ref = sample_ref(logits, temps, seeds, pos)
    assert out.tokens.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert out.valid.all()
    assert torch.equal(out.tokens, ref.tokens)
    assert_close64(out, logits, temps)
    assert_close64(ref, logits, temps)


@pytest.mark.parametrize("temperature", [1e-3, 1e3, 0.0, 1.0])
@pytest.mark.parametrize("scale", [1e4, 5.0])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_kernel_extremes_masked_entries(temperature, scale):
    """Huge and tiny temperatures, logits of +-1e4, and half the entries masked with -inf."""
    B, V = 4, 1000
    logits = random_logits(B, V, scale=scale)
    logits[torch.rand(B, V) < 0.5] = float("-inf")
    logits[3, :-1] = float("-inf")  # a single finite entry: log-prob 0, entropy 0
    logits[3, -1] = 5.0
    out = _sample_triton(logits, temperature, 3, torch.arange(B))
    ref = sample_ref(logits, temperature, 3, torch.arange(B))
    assert out.valid.all()
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.isfinite(logits.gather(1, out.tokens[:, None])).all()
    assert out.tokens[3] == V - 1 and out.logprobs[3] == 0 and out.entropy[3] == 0
    assert_close64(out, logits, temperature)
    assert_close64(ref, logits, temperature)


def test_kernel_noncontiguous_views():
    """A row-strided view of a larger buffer, and a column-strided (transposed) one."""
    B, V = 3, 700
    big = random_logits(B, V + 50, torch.bfloat16)
    view = big[:, 17 : 17 + V]
    tall = random_logits(V, B).t()  # stride (1, B)
    for logits in (view, tall):
        out = _sample_triton(logits, 0.9, 5, torch.arange(B))
        dense = _sample_triton(logits.contiguous(), 0.9, 5, torch.arange(B))
        assert torch.equal(out.tokens, dense.tokens)
        assert torch.equal(out.logprobs, dense.logprobs) and torch.equal(out.entropy, dense.entropy)
        assert_close64(out, logits, 0.9)


def test_kernel_per_row_tensors_and_scalars_agree():
    B, V = 3, 300
    logits = random_logits(B, V)
    a = _sample_triton(logits, 0.8, 42, None)
    b = _sample_triton(logits, torch.full((B,), 0.8), torch.full((B,), 42), torch.zeros(B, dtype=torch.int64))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_public_sample_dispatches_to_kernel_under_interpreter():
    logits = random_logits(2, 50)
    out = sample(logits, 1.0, 9, torch.tensor([4, 5]))
    assert isinstance(out, SampleOutput)
    assert torch.equal(out.tokens, sample_ref(logits, 1.0, 9, torch.tensor([4, 5])).tokens)


@pytest.mark.parametrize("impl", ["kernel", "ref"])
def test_greedy_is_argmax_with_ties_to_lowest_index(impl):
    B, V = 3, 200
    logits = random_logits(B, V)
    logits[0, [150, 20, 90]] = 50.0  # ties within a chunk and across chunks (chunk = 16 below)
    logits[1, [199, 5]] = 50.0
    run = (lambda *a: _sample_triton(*a, config=LaunchConfig(16))) if impl == "kernel" else sample_ref
    out = run(logits, 0.0, 1, torch.arange(B))
    assert out.tokens.tolist() == [20, 5, int(logits[2].argmax())]
    # log-prob and entropy of the untempered distribution
    assert_close64(out, logits, 1.0)


# ------------------------------------------------------------------------------------------------
# Reference: any rows
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 5),
    V=st.integers(1, 300),
    temp=st.sampled_from([0.0, 1e-3, 0.3, 1.0, 7.0]),
    scale=st.sampled_from([0.1, 3.0, 1e4]),
    masked=st.floats(0.0, 0.9),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_reference_properties(B, V, temp, scale, masked, dtype, seed):
    """Any rows: a valid token has a finite logit, log-prob <= 0, 0 <= entropy <= ln(live entries),
    and the values match float64."""
    g = torch.Generator().manual_seed(abs(seed) % 2**31)
    logits = (torch.randn(B, V, generator=g) * scale).to(dtype)
    logits[torch.rand(B, V, generator=g) < masked] = float("-inf")
    out = sample_ref(logits, temp, seed, torch.arange(B))
    live = torch.isfinite(logits.float())
    assert torch.equal(out.valid, live.any(1))
    ok = out.valid
    assert torch.isfinite(logits.float()[ok].gather(1, out.tokens[ok][:, None])).all()
    assert (out.logprobs[ok] <= 0).all()
    tol = 1e-5 * math.log(V + 1)
    assert (out.entropy[ok] >= -tol).all()
    assert (out.entropy[ok] <= live[ok].sum(1).double().log() + tol).all()
    if ok.all():
        assert_close64(out, logits, temp)


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [1000, 32001, 151936])
def test_gpu_values_and_tokens(V, dtype):
    B = 64
    logits, temps, seeds, pos = sampler_batch(B, V, dtype)
    out = sample(logits, temps, seeds, pos)
    ref = sample_ref(logits, temps, seeds, pos)
    assert (out.tokens == ref.tokens).float().mean() >= 0.98  # float-rounding ties at boundaries
    assert_close64(out, logits, temps)
