"""Randomness is counter-based: a row's token depends on its seed, position and logits, never on
the batch around it; equal inputs give equal tokens, other seeds other tokens, and Python seeds past
int64 wrap like int64 tensors."""

import pytest
import torch
from helpers import random_logits

from arpo_fast.kernels import sample, sample_ref
from arpo_fast.kernels.sampling import LaunchConfig, _sample_triton


def test_kernel_row_token_independent_of_batch():
    """A row alone, at several places in a batch, and in a batch of another size: same token."""
    V = 7
    logits = random_logits(120, V)
    seeds, pos = torch.randint(0, 2**62, (120,)), torch.randint(0, 2**40, (120,))
    batch = _sample_triton(logits, 1.0, seeds, pos)
    for rows in ([0], [119], [5, 77, 3], list(range(30, 60))):
        part = _sample_triton(logits[rows], 1.0, seeds[rows], pos[rows])
        assert torch.equal(batch.tokens[rows], part.tokens)
        assert torch.equal(batch.logprobs[rows], part.logprobs)


def test_reference_row_token_independent_of_batch_of_1000():
    V = 1000
    logits = random_logits(1000, V)
    seeds, pos = torch.randint(0, 2**62, (1000,)), torch.arange(1000) * 3
    batch = sample_ref(logits, 0.9, seeds, pos)
    for r in (0, 1, 511, 999):
        alone = sample_ref(logits[r : r + 1], 0.9, seeds[r : r + 1], pos[r : r + 1])
        assert batch.tokens[r] == alone.tokens[0]


def test_same_inputs_same_tokens_and_seeds_matter():
    logits = random_logits(4, 500)
    a = _sample_triton(logits, 1.0, 123, torch.arange(4))
    b = _sample_triton(logits, 1.0, 123, torch.arange(4))
    assert torch.equal(a.tokens, b.tokens)
    flat = torch.zeros(1, 500).expand(64, 500)  # uniform rows: tokens are the uniforms' images
    toks = sample_ref(flat, 1.0, torch.arange(64), None).tokens
    assert toks.unique().numel() > 40


def test_large_python_seeds_wrap_like_int64_tensors():
    logits = random_logits(3, 40)
    big = 2**64 - 5  # the same 64 bits as the int64 -5
    a = _sample_triton(logits, 1.0, big, torch.arange(3))
    b = _sample_triton(logits, 1.0, torch.full((3,), -5), torch.arange(3))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens, sample_ref(logits, 1.0, big, torch.arange(3)).tokens)
    c = _sample_triton(logits, 1.0, 1, torch.arange(3))  # 1 must not be specialised away
    assert torch.equal(c.tokens, sample_ref(logits, 1.0, 1, torch.arange(3)).tokens)


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_invariance_batch_of_1000():
    V = 151936
    logits = torch.randn(1000, V, device="cuda").bfloat16()
    seeds = torch.randint(0, 2**62, (1000,), device="cuda")
    pos = torch.arange(1000, device="cuda")
    batch = sample(logits, 1.0, seeds, pos)
    for r in (0, 17, 999):
        alone = sample(logits[r : r + 1], 1.0, seeds[r : r + 1], pos[r : r + 1])
        assert batch.tokens[r] == alone.tokens[0] and batch.logprobs[r] == alone.logprobs[0]
    other = _sample_triton(logits[:200], 1.0, seeds[:200], pos[:200], config=LaunchConfig(512))
    assert (other.tokens == batch.tokens[:200]).float().mean() >= 0.99
