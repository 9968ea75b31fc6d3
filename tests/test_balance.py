"""A distributed update's split of each mini-batch over the ranks (``balance.py``) and the data that
moves (``exchange.py``), in one process: every trajectory trains on exactly one rank, every rank
gets work, and the ranks' gradients add up to the one-process gradient."""

import copy

import pytest
import torch
from helpers import tiny_model
from test_packing import random_rollout

from arpo_fast.algo import group_advantages, token_advantages
from arpo_fast.train import balance
from arpo_fast.train.exchange import merge, payload
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.packing import pack_trees
from arpo_fast.train.update import UpdateData, update
from arpo_fast.train.update_config import UpdateConfig


def _advantages(record, seed: int):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(record.trajectories), generator=g).tolist()
    seq = group_advantages(rewards, [t.prompt_index for t in record.trajectories])
    paths = [[(u, len(record.segments[u])) for u in t.path] for t in record.trajectories]
    return token_advantages(seq, paths, "soft")


def _ranks(record, advantages, world: int, share: bool = True):
    """The record as ``world`` ranks hold it after the split (prompt p rolled out on rank p % W,
    one mini-batch of every prompt): per rank (record, advantages, rows), and the plan."""
    held = [
        [i for i, t in enumerate(record.trajectories) if t.prompt_index % world == r] for r in range(world)
    ]
    units = sorted(
        (
            s
            for r in range(world)
            for s in balance.shapes(record, held[r], share, r, range(len(record.prompts)))
        ),
        key=lambda s: s.position,
    )
    split = balance.plan(units, world)
    ranks = []
    for dest in range(world):
        # every trajectory keeps its index in the whole record here: the shapes' rows are global
        wanted = [(0, i) for s, trajectories in split.pieces[dest] for i in trajectories]
        mine, adv, groups = merge([payload(record, advantages, wanted)], 1)
        ranks.append((mine, adv, groups[0]))
    return ranks, split


@pytest.mark.parametrize("world", [2, 3, 4, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_trajectory_trains_once_and_every_rank_works(world, seed):
    record = random_rollout(seed, prompts=1 if world < 4 else 2, initial=4)
    ranks, split = _ranks(record, _advantages(record, seed), world)
    rows = [i for pieces in split.pieces for _, trajectories in pieces for i in trajectories]
    assert sorted(rows) == list(range(len(record.trajectories)))
    if len(record.trajectories) >= world:
        assert split.idle == 0 and all(rows for _, _, rows in ranks)
    whole = pack_trees(record, _advantages(record, seed), range(len(record.trajectories)), 10**6)
    spread = [b for mine, adv, rows in ranks for b in pack_trees(mine, adv, rows, 10**6)]
    # each copy of a model-written token counts once, on one rank
    assert sum(b.model_tokens for b in spread) == sum(b.model_tokens for b in whole)
    assert split.loads == [sum(b.tokens for b in pack_trees(m, a, r, 10**6)) for m, a, r in ranks]
    assert sum(split.loads) >= whole[0].tokens


def test_trees_stay_whole_where_they_fit():
    """Four trees of one size on two ranks: two whole trees each, nothing laid out twice."""
    record = random_rollout(5, prompts=1)
    paths = balance.shapes(record, range(len(record.trajectories)), True, 0, [0])[0].paths
    units = [balance.Shape(p % 2, p, paths) for p in range(4)]
    split = balance.plan(units, 2)
    assert [[s for s, _ in pieces] for pieces in split.pieces] == [[0, 1], [2, 3]]
    assert split.loads[0] == split.loads[1] and balance.balance([split]) == 1.0


def test_balance_is_the_slowest_rank_over_the_mean():
    plans = [balance.Plan([[], []], [30, 10]), balance.Plan([[], []], [20, 20])]
    assert balance.balance(plans) == pytest.approx((30 + 20) / (20 + 20))
    assert balance.Plan([[], []], [5, 0]).idle == 1 and balance.Plan([[], []], [0, 0]).idle == 0


class _Rank:
    """A ``distributed.Dist`` stand-in for one of several simulated ranks: the token counts of
    every rank's mini-batches are known up front; it runs its own micro-batches only."""

    world = 1

    def __init__(self, totals):
        self.totals = totals

    def sum(self, values):
        return list(self.totals)

    def max(self, values):
        return list(values)


@pytest.mark.parametrize("packed_update,budget", [(True, 10**6), (True, 24), (False, 10**6)])
def test_the_ranks_gradients_add_up_to_one_process(packed_update, budget):
    """The loss of the split is the one-process loss: split trees too (with 24-token rows their
    parts are split again, with prompt contexts)."""
    model = tiny_model("qwen2")
    record = random_rollout(11, prompts=2, initial=3)
    adv = _advantages(record, 12)
    cfg = UpdateConfig(
        mini_batch_prompts=2, packed_update=packed_update, micro_batch_tokens=budget, grad_clip=0.0
    )
    whole = _gradients(model, UpdateData(record, adv), cfg, None)
    ranks, _ = _ranks(record, adv, 3, share=packed_update)
    total = sum(b.model_tokens for b in pack_trees(record, adv, range(len(record.trajectories)), 10**6))
    parts = [
        _gradients(model, UpdateData(mine, a, mini_batches=[rows]), cfg, _Rank([total]))
        for mine, a, rows in ranks
    ]
    for k, g in enumerate(whole):
        torch.testing.assert_close(sum(p[k] for p in parts), g, rtol=1e-4, atol=1e-6)


def _gradients(model, data, cfg, dist) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    grads = []

    class _Keep(torch.optim.SGD):
        def step(self, closure=None):
            grads.extend(p.grad.detach().clone() for g in self.param_groups for p in g["params"])

    optimizer = MasterWeights(model.parameters(), lambda ps: _Keep(ps, lr=0.0))
    update(model, optimizer, data, cfg, dist=dist)
    return grads
