"""The sampler on bad input: rows with NaN, +inf or no finite entry are flagged and harm no other
row, ``check=True`` names them, bad arguments get clear errors, and an empty batch is fine."""

import pytest
import torch
from helpers import random_logits

from arpo_fast.kernels import sample, sample_ref
from arpo_fast.kernels.sampling import _sample_triton


# numpy, under the interpreter, warns about the NaN and inf arithmetic these rows are made of.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", ["kernel", "ref"])
def test_invalid_rows_are_flagged_and_harm_no_other_row(impl):
    B, V = 5, 100
    logits = random_logits(B, V)
    logits[1, 37] = float("nan")
    logits[2] = float("-inf")
    logits[4, 3] = float("inf")
    run = _sample_triton if impl == "kernel" else sample_ref
    out = run(logits, 1.0, 8, torch.arange(B))
    assert out.valid.tolist() == [True, False, False, True, False]
    assert out.tokens[[1, 2, 4]].tolist() == [-1, -1, -1]
    assert torch.isnan(out.logprobs[[1, 2, 4]]).all() and torch.isnan(out.entropy[[1, 2, 4]]).all()
    alone = run(logits[[0, 3]], 1.0, 8, torch.tensor([0, 3]))
    assert torch.equal(out.tokens[[0, 3]], alone.tokens)
    assert torch.equal(out.logprobs[[0, 3]], alone.logprobs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_check_true_names_the_bad_rows():
    logits = random_logits(4, 30)
    logits[1, 0] = float("nan")
    logits[3] = float("-inf")
    with pytest.raises(ValueError, match=r"rows 1, 3"):
        sample(logits, check=True)
    with pytest.raises(ValueError, match=r"rows 1, 3"):
        sample_ref(logits, check=True)
    sample(logits[[0, 2]], check=True)  # good rows pass


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="logits must be"):
        sample(torch.randn(3))
    with pytest.raises(ValueError, match="logits must be"):
        sample(torch.randn(2, 5, dtype=torch.float64))
    for fn in (sample, sample_ref):
        with pytest.raises(ValueError, match="temperature must be"):
            fn(torch.randn(2, 5), temperature=torch.ones(3))
        with pytest.raises(ValueError, match="position must be"):
            fn(torch.randn(2, 5), position=torch.zeros(2, 1, dtype=torch.int64))
        with pytest.raises(ValueError, match="temperature is NaN"):
            fn(torch.randn(2, 5), temperature=float("nan"))


def test_empty_batch():
    out = sample(torch.randn(0, 10))
    assert out.tokens.shape == (0,) and out.valid.shape == (0,)
