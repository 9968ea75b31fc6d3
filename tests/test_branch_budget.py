"""The pooled branch budget (the default of --arpo-semantics reference): copies and fills branch as
in the reference, the tree stays a function of the seed whatever the tool latency, and the
reference's rule draws once per copy."""

import random

import pytest
from test_tree import ANSWER, CALL, OrderedTools, _run

from arpo_fast.rollout.tree import ARPOConfig
from arpo_fast.train.config import TrainConfig


def _points(out):
    """Branch points (source, fork) and the number of copies of each."""
    points: dict = {}
    for t in out.trajectories:
        if t.kind == "branch":
            key = (t.parent, tuple(t.path[:-1]))
            points[key] = points.get(key, 0) + 1
    return points


def _reference(tok, budget, calls=2, prompts=60, branches=2, rollouts=16):
    cfg = ARPOConfig(
        rollouts=rollouts,
        initial=8,
        branches=branches,
        entropy_tokens=2,
        threshold=0.5,
        arpo_semantics="reference",
        branch_budget=budget,
    )
    ids = [tok.encode(f"P{i}\n") for i in range(prompts)]
    return _run(tok, lambda s: [CALL] * calls + [ANSWER], cfg, prompts=ids, max_calls=calls)[0]


def test_pooled_lets_copies_and_fills_branch_as_the_reference_does(tok):
    """16/8/2 at tau 0.5 (a constant entropy: dH = 0) with two calls each: the pre-split budget
    never lets a copy branch and stays near 8 * (1/2 + 1/4) = 6 branch points per prompt; the pool
    lets copies branch (the reference: about 7.8 points, 0.4 of them by copies;
    benchmarks/bench_branch_budget.py)."""
    split, pooled = (_reference(tok, budget) for budget in ("split", "pooled"))
    for out in (split, pooled):
        for p in range(60):
            assert sum(t.prompt_index == p for t in out.trajectories) == 16
    kinds = [[out.trajectories[s].kind for s, _ in _points(out)] for out in (split, pooled)]
    assert "branch" not in kinds[0] and abs(len(kinds[0]) / 60 - 6.0) < 0.4
    assert len(kinds[1]) / 60 > 7.3 and kinds[1].count("branch") / 60 > 0.2
    one_call = _reference(tok, "pooled", calls=1)  # the pool left after the calls goes to fills
    assert [one_call.trajectories[s].kind for s in {s for s, _ in _points(one_call)}].count("fill") > 30


def test_the_pooled_tree_does_not_depend_on_tool_latency(tok):
    cfg = ARPOConfig(rollouts=8, initial=3, entropy_tokens=2, threshold=0.6, arpo_semantics="reference")
    plan = lambda s: [CALL] * (1 + s % 3) + [ANSWER]  # noqa: E731
    entropy = lambda seed, r, i: (seed >> (r + i)) % 5 * 0.4  # noqa: E731
    runs = []
    for k in range(3):
        rng = random.Random(k)
        out, engine, _ = _run(
            tok,
            plan,
            cfg,
            entropy=entropy,
            seed=11,
            prompts=[tok.encode(f"Q{j}\n") for j in range(3)],
            tools=OrderedTools([rng.random() * 0.02 for _ in range(300)]),
        )
        assert not engine.seqs
        runs.append([(t.prompt_index, t.kind, t.parent, t.response_ids, t.path) for t in out.trajectories])
        assert out.stats["branch_points"] > 0
        assert all(sum(t.prompt_index == p for t in out.trajectories) == 8 for p in range(3))
    assert runs[0] == runs[1] == runs[2]


def test_the_reference_rule_draws_once_per_copy(tok):
    """Z = 3 at tau 0.5: the reference draws for each of the Z - 1 copies, so a branch point has one
    copy two times in three; ours draws once for all Z - 1."""
    one = _points(_reference(tok, "split", calls=1, prompts=60, branches=3, rollouts=40))  # 4 slots each
    share = sum(n == 1 for n in one.values()) / len(one)
    assert set(one.values()) == {1, 2} and abs(share - 2 / 3) < 0.1
    cfg = ARPOConfig(rollouts=16, initial=4, branches=3, entropy_tokens=2, threshold=0.5)
    ids = [tok.encode(f"P{i}\n") for i in range(40)]
    ours = _run(tok, lambda s: [CALL, ANSWER], cfg, prompts=ids)[0]
    assert set(_points(ours).values()) == {2}


def test_branch_budget_settings():
    assert not ARPOConfig().pooled and ARPOConfig(arpo_semantics="reference").pooled
    assert not ARPOConfig(arpo_semantics="reference", branch_budget="split").pooled
    with pytest.raises(ValueError, match="pooled needs arpo_semantics reference"):
        ARPOConfig(branch_budget="pooled")
    with pytest.raises(ValueError, match="branch_budget must be"):
        ARPOConfig(branch_budget="shared")
    assert TrainConfig(out="x").rollout.branch_budget == "split"
    assert TrainConfig.from_flat(out="x", arpo_semantics="reference").rollout.branch_budget == "pooled"
