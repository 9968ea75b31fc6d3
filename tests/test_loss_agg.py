"""--loss-agg: verl's aggregation modes and the reference's dynamic-batch weighting, the same loss in
the packed and per-trajectory layouts, and what each mode resolves to."""

import copy

import pytest
import torch
from helpers import tiny_model
from test_packing import _advantages, _run, random_rollout

from arpo_fast.algo.aggregation import LOSS_AGG, balanced_groups, trajectory_weights
from arpo_fast.kernels import logprob_entropy_ref
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.update_config import LOSS_AGG as CONFIG_LOSS_AGG
from arpo_fast.train.update_config import UpdateConfig


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _agg(loss_mat, mask, mode, lengths, budget):
    """verl's agg_loss on [B, T] rows, and for dynamic-bsz its micro-batches' token-means each
    weighted by its share of the rows (what the reference's actor does with use_dynamic_bsz)."""
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return (loss_mat * m).sum() / m.sum()
    if mode == "seq-mean-token-sum":
        return (loss_mat * m).sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return ((loss_mat * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()
    total = 0.0
    for group in balanced_groups(lengths, budget):
        rows = torch.tensor(group)
        total = total + (loss_mat[rows] * m[rows]).sum() / m[rows].sum() * len(group) / len(lengths)
    return total


def _direct_gradient(model, trajs, adv, mode, budget):
    """The first step's gradient (old = current, so the loss is -A * ratio) from [B, T] rows."""
    model = copy.deepcopy(model).double()
    width = max(len(t.response_ids) for t in trajs)
    loss_mat = torch.zeros(len(trajs), width, dtype=torch.float64)
    mask = torch.zeros(len(trajs), width, dtype=torch.bool)
    for r, t in enumerate(trajs):
        hidden = model.model(input_ids=torch.tensor([t.prompt_ids + t.response_ids])).last_hidden_state[0]
        start, n = len(t.prompt_ids) - 1, len(t.response_ids)
        lp = logprob_entropy_ref(
            hidden[start : start + n], model.lm_head.weight, torch.tensor(t.response_ids)
        )[0]
        row = -adv[r].double() * torch.exp(lp - lp.detach())
        loss_mat = loss_mat.index_put((torch.tensor([r]), torch.arange(n)), row)
        mask[r, :n] = torch.tensor(t.loss_mask, dtype=torch.bool)
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
    _agg(loss_mat, mask, mode, lengths, budget).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("mode", LOSS_AGG)
def test_each_mode_is_verls_aggregation_in_both_layouts(mode):
    """One mini-batch of three trees with shared branches: the packed update's gradient, the
    per-trajectory update's and the direct [B, T] computation agree; the modes differ."""
    model = tiny_model("qwen2", seed=3)
    tree = random_rollout(seed=4, prompts=3, initial=2)
    adv = _advantages(tree, "soft", seed=5)
    cfg = dict(mini_batch_prompts=3, micro_batch_tokens=48, grad_clip=0.0, loss_agg=mode)
    grads = [_run(model, tree, adv, packed_update=packed, **cfg)[1][0] for packed in (True, False)]
    want = _direct_gradient(model, tree.trajectories, adv, mode, budget=48)
    scale = max(float(g.abs().max()) for g in want)  # fp32 error grows with the gradient's size
    for packed, plain, direct in zip(*grads, want, strict=True):
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(plain.double(), direct, rtol=1e-4, atol=1e-5 * scale)
    if mode != "token-mean":
        token_mean = _run(model, tree, adv, **{**cfg, "loss_agg": "token-mean"})[1][0]
        assert not all(torch.allclose(a, b) for a, b in zip(grads[0], token_mean))


def test_weights_of_each_mode():
    tokens, lengths = [4, 1, 3], [10, 5, 8]
    assert trajectory_weights("token-mean", tokens, lengths, 100) == [1.0] * 3
    assert trajectory_weights("seq-mean-token-sum", tokens, lengths, 100) == [1.0] * 3
    assert trajectory_weights("seq-mean-token-mean", tokens, lengths, 100) == [0.25, 1.0, 1 / 3]
    # one micro-batch (23 tokens fit 100): every token weighs 3 / 8, i.e. the token-mean times S
    assert trajectory_weights("dynamic-bsz", tokens, lengths, 100) == [3 / 8] * 3
    # ceil(23 / 12) = 2 micro-batches: {10} and {5, 8}
    assert balanced_groups(lengths, 12) == [[0], [1, 2]]
    assert trajectory_weights("dynamic-bsz", tokens, lengths, 12) == [1 / 4, 2 / 4, 2 / 4]
    assert balanced_groups([7, 7], 1) == [[0], [1]] and balanced_groups([], 5) == []


def test_loss_agg_resolves_per_semantics_and_is_checked():
    assert CONFIG_LOSS_AGG == LOSS_AGG
    assert TrainConfig(out="x").update.loss_agg == "token-mean"
    ref = TrainConfig.from_flat(out="x", arpo_semantics="reference")
    assert ref.update.loss_agg == "dynamic-bsz" and "loss_agg" in ref.auto_settings
    given = TrainConfig.from_flat(out="x", arpo_semantics="reference", loss_agg="seq-mean-token-mean")
    assert given.update.loss_agg == "seq-mean-token-mean"
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        UpdateConfig(loss_agg="sum")
