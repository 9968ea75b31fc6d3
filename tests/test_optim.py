"""fp32 master weights: small updates to a bf16 model accumulate instead of rounding away."""

import pytest
import torch

from arpo_fast.train.optim import MasterWeights


def _steps(param, optimizer, n, grad=1.0):
    for _ in range(n):
        param.grad = torch.full_like(param, grad)
        norm = optimizer.clip_and_step(0.0)
        optimizer.zero_grad()
    return norm


def test_bf16_weights_follow_their_fp32_masters():
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    direct = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(100):  # AdamW on bf16 itself: each 1e-4 step is below bf16's resolution at 1.0
        plain.grad = torch.ones_like(plain)
        direct.step()
    assert torch.equal(plain.detach(), torch.ones(4, dtype=torch.bfloat16))

    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeights([w], lr=1e-4)
    _steps(w, opt, 100)
    assert opt.master[0].dtype == torch.float32
    torch.testing.assert_close(opt.master[0].detach(), torch.full((4,), 1 - 100e-4), rtol=0, atol=1e-5)
    assert torch.equal(w.detach(), opt.master[0].detach().bfloat16())  # written back in place
    assert float(w.detach()[0]) < 1


def test_fp32_parameters_are_stepped_without_a_copy():
    w = torch.nn.Parameter(torch.ones(3))
    opt = MasterWeights([w], lambda ps: torch.optim.SGD(ps, lr=0.5))
    assert opt.master[0] is w and opt.state_dict()["master"] == {}
    _steps(w, opt, 1)
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.5))


def test_clipping_and_non_finite_gradients():
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = MasterWeights([w], lambda ps: torch.optim.SGD(ps, lr=1.0))
    w.grad = torch.full_like(w, 3.0)
    assert opt.clip_and_step(1.0) == pytest.approx(6.0)  # norm before clipping
    torch.testing.assert_close(w.detach().float(), torch.full((4,), -0.5), rtol=0, atol=1e-3)
    opt.zero_grad()
    w.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=torch.bfloat16)
    before = (w.detach().clone(), opt.master[0].detach().clone())
    assert opt.clip_and_step(1.0) != opt.clip_and_step(1.0)  # NaN: the step is skipped, twice
    assert torch.equal(w.detach(), before[0]) and torch.equal(opt.master[0].detach(), before[1])


def test_state_round_trip_restores_masters_and_weights():
    w = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    opt = MasterWeights([w], lr=1e-3)
    _steps(w, opt, 3)
    state = opt.state_dict()
    w2 = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    opt2 = MasterWeights([w2], lr=1e-3)
    opt2.load_state_dict(state)
    assert torch.equal(opt2.master[0], opt.master[0]) and torch.equal(w2, w)
    _steps(w, opt, 2)
    _steps(w2, opt2, 2)
    assert torch.equal(opt2.master[0], opt.master[0])
    fp32 = MasterWeights([torch.nn.Parameter(torch.ones(5))], lr=1e-3)
    with pytest.raises(ValueError, match="fp32 masters for 1 parameters, this model needs them for 0"):
        fp32.load_state_dict(state)


def test_micro_batch_gradients_are_summed_in_fp32():
    """256 backward passes into a bf16 parameter: the masters hold their fp32 sum (a bf16 .grad
    summed in bf16 drifts by ~2%)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64).bfloat16())
    opt = MasterWeights([w], lr=1e-3)
    exact = torch.zeros(64, 64, dtype=torch.float64)
    for _ in range(256):
        x = torch.randn(8, 64).bfloat16()
        (x @ w).float().square().mean().backward()
        # this micro-batch's own gradient, as backward computes it in bf16
        exact += (2 * x.float().T @ (x.float() @ w.detach().float()) / (8 * 64)).double()
    assert w.grad is None  # moved into the master as soon as it was made
    error = (opt.master[0].grad.double() - exact).norm() / exact.norm()
    assert error < 2e-3  # bf16 rounding of each micro-batch's gradient only, not of the running sum
