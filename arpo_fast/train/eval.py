"""Evaluation on held-out prompts, with the training run's own engine, tools and rewards.

Greedy pass@1: one trajectory per prompt at temperature 0. With ``samples`` = k > 0 also k sampled
trajectories per prompt at ``temperature`` (the rollout's by default): the sampled accuracy (pass@1
of a sampled answer, the mean over all k x prompts of them: what the policy that trains gets right)
and pass@k (the best of the k, per prompt). Both go through the tree rollout with ``initial ==
rollouts``, so nothing branches: the same engine, protocol, tool executor, response length and call
limit as training, and the same reward function; "correct" is the reward's correctness before any
tool bonus (token F1 for ``arpo_f1``: 0 or 1 for a one-word answer such as a number).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Optional

from arpo_fast.engine import SamplingParams
from arpo_fast.rollout.tree import arpo_rollout
from arpo_fast.seeds import child_seed

EVAL_SEED_INDEX = 1 << 40
"""The sampled evaluation's seed is child_seed(run seed, this): the same draws at every evaluation,
apart from the training steps' (which use child_seed(seed, step))."""


def _rollout(run, examples: Sequence, k: int, temperature: float, seed: int, positions: Sequence[int]):
    import torch

    config = dataclasses.replace(run.cfg.rollout, rollouts=k, initial=k)
    sampling = SamplingParams(
        temperature,
        top_k=run.cfg.top_k if temperature > 0 else 0,
        top_p=run.cfg.top_p if temperature > 0 else 1.0,
    )
    with torch.no_grad():  # a prompt's draws depend on its place in the whole set, not in a share
        rollout = arpo_rollout(
            run.engine,
            run.protocol,
            [e.prompt_ids for e in examples],
            config,
            sampling,
            run.executor,
            seed=seed,
            prompt_seeds=[child_seed(seed, i) for i in positions],
        )
    if run.executor is not None:
        run.executor.new_step()  # an evaluation's calls are not served to the next training step
    return rollout.trajectories


def evaluate(
    run, examples: Sequence, step: int, score, positions: Optional[Sequence[int]] = None, split: str = "eval"
) -> dict:
    """Evaluate ``run``'s model on ``examples`` (``data.Example``); ``score(trajectories, examples,
    tokenizer, rewards)`` is the training loop's reward function; ``positions``: each example's
    index in the whole held-out set (default: its index here), which seeds its draws. Returns one
    metrics row:
    ``step`` and ``<split>/...`` means over trajectories (``accuracy`` (greedy), ``format_ok``,
    ``reward``, ``tool_calls``, ``response_tokens``; with samples ``sampled_accuracy``,
    ``pass@k`` and ``tool_calls@k``)."""
    cfg = run.cfg
    t0 = time.perf_counter()
    positions = list(range(len(examples))) if positions is None else list(positions)
    trajs = _rollout(run, examples, 1, 0.0, 0, positions)
    rewards = score(trajs, examples, run.tokenizer, run.rewards)
    n = max(len(trajs), 1)  # a rank's share of a small set may be empty
    row = {
        "step": step,
        f"{split}/accuracy": sum(r.correctness for r in rewards) / n,
        f"{split}/format_ok": sum(r.score > -1 for r in rewards) / n,
        f"{split}/reward": sum(r.score for r in rewards) / n,
        f"{split}/tool_calls": sum(t.tool_calls for t in trajs) / n,
        f"{split}/response_tokens": sum(len(t.response_ids) for t in trajs) / n,
        f"{split}/examples": len(trajs),
    }
    k = cfg.eval_samples
    if k:
        temperature = cfg.eval_temperature or cfg.temperature
        seed = child_seed(cfg.seed, EVAL_SEED_INDEX)
        trajs = _rollout(run, examples, k, temperature, seed, positions)
        correct = [r.correctness for r in score(trajs, examples, run.tokenizer, run.rewards)]
        best = [0.0] * len(examples)
        for t, c in zip(trajs, correct):
            best[t.prompt_index] = max(best[t.prompt_index], c)
        row[f"{split}/sampled_accuracy"] = sum(correct) / max(len(correct), 1)
        row[f"{split}/pass@{k}"] = sum(best) / n
        row[f"{split}/tool_calls@{k}"] = sum(t.tool_calls for t in trajs) / max(len(trajs), 1)
    row[f"{split}/s"] = round(time.perf_counter() - t0, 3)
    return row


def evaluate_run(run, step: int, reporter, score, split: str = "eval") -> None:
    """A held-out (``eval``) or the final ``test`` evaluation of a training run (``run_state.Run``) to its
    ``reporter`` (``report.Reporter``, or None on ranks but the first); under torchrun each rank
    takes its share of the examples and rank 0 reports the whole."""
    from arpo_fast.train import metrics

    examples = run.test_examples if split == "test" else run.eval_examples
    if not examples:
        return
    d = run.dist
    run.residency.rollout()  # the KV pool and the rollout copy back in place
    mine = d.mine(len(examples)) if d else list(range(len(examples)))
    row = evaluate(run, [examples[i] for i in mine], step, score, positions=mine, split=split)
    if d is not None:
        d.barrier(group=d.rollout_group)  # the slowest rank's evaluation is waited for here
        row = metrics.eval_row(row, d)
    if reporter is not None:
        (reporter.test if split == "test" else reporter.evaluation)(row)
