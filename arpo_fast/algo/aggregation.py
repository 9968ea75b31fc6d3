"""How a mini-batch's per-token losses add up to one number (``--loss-agg``, verl's names).

Every mode is a weighted sum over the model-written tokens, one weight per trajectory::

    loss = sum over trajectories t of u_t * (sum of t's token losses) / Z

===================== =============================== ==============================
mode                  u_t                             Z
===================== =============================== ==============================
token-mean            1                               model-written tokens
seq-mean-token-mean   1 / (t's model-written tokens)  trajectories
seq-mean-token-sum    1                               trajectories
dynamic-bsz           n_b / T_b of t's micro-batch b  trajectories
===================== =============================== ==============================

``dynamic-bsz`` is the weighting of the reference (verl with ``use_dynamic_bsz``): each micro-batch's
token-mean times its share of the mini-batch's sequences, n_b / S, so a token of micro-batch b
weighs n_b / (S T_b). Its micro-batches are the reference's, not the update's own: the
trajectories split into min(S, ceil(sum of lengths / budget)) groups balanced by prompt + response
length (verl balances with Karmarkar-Karp, here longest first into the lightest group: the same
rule, not always the same groups). So the weights do not depend on how the update lays tokens out.

A clipped token loss is positively homogeneous in its advantage, so u_t is folded into the
advantages (:func:`weighted_advantages`): a token shared by several trajectories, computed once by
``shared_policy_loss``, then still weighs each copy by its own trajectory's u_t, and the packed and
per-trajectory layouts give the same loss. The update divides the sum by Z (:func:`denominator`).
The entropy bonus and the KL penalty stay token-means (verl aggregates them by the mode too; both
are off by default, as in the reference). The logged ``loss`` is the token-mean of the weighted
token losses (sum of u_t l over the model-written tokens), the objective itself for token-mean only.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

from arpo_fast.rollout.rollout_tree import RolloutTree

LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dynamic-bsz")


def check_mode(mode: str) -> None:
    if mode not in LOSS_AGG:
        raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGG)}, got {mode!r}")


def balanced_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` in min(n, ceil(sum / budget)) groups, each length going, longest
    first, into the group with the fewest tokens so far (ties: the lower group)."""
    if not lengths:
        return []
    count = min(len(lengths), max(1, math.ceil(sum(lengths) / budget)))
    heap = [(0, g) for g in range(count)]
    groups: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (tokens + lengths[i], g))
    return [sorted(g) for g in groups if g]


def trajectory_weights(
    mode: str, model_tokens: Sequence[int], lengths: Sequence[int], budget: int
) -> list[float]:
    """u_t of each trajectory of one mini-batch (module docstring).

    Args:
        model_tokens: per trajectory, its model-written (loss) tokens.
        lengths: per trajectory, prompt + response tokens (``dynamic-bsz``'s grouping).
        budget: tokens per micro-batch of ``dynamic-bsz``'s grouping.
    """
    check_mode(mode)
    if mode in ("token-mean", "seq-mean-token-sum"):
        return [1.0] * len(model_tokens)
    if mode == "seq-mean-token-mean":
        return [1.0 / max(n, 1) for n in model_tokens]
    weights = [0.0] * len(model_tokens)
    for group in balanced_groups(lengths, budget):
        tokens = max(sum(model_tokens[i] for i in group), 1)
        for i in group:
            weights[i] = len(group) / tokens
    return weights


def denominator(mode: str, model_tokens: int, trajectories: int) -> int:
    """Z of one mini-batch: its model-written tokens for ``token-mean``, else its trajectories."""
    check_mode(mode)
    return model_tokens if mode == "token-mean" else trajectories


def weighted_advantages(
    record: RolloutTree, advantages: Sequence[torch.Tensor], group: Sequence[int], mode: str, budget: int
) -> Sequence[torch.Tensor]:
    """``advantages`` (per trajectory of ``record``, fp32 [len(response)]) with those of the
    mini-batch ``group`` (trajectory indices) times their u_t; ``budget``: ``dynamic-bsz``'s
    tokens per micro-batch. Token-mean weighs every trajectory 1: ``advantages`` itself."""
    check_mode(mode)
    if mode == "token-mean":
        return advantages
    trajectories = [record.trajectories[i] for i in group]
    model_tokens = [sum(t.loss_mask) for t in trajectories]
    lengths = [len(t.prompt_ids) + t.response_length for t in trajectories]
    weights = dict(zip(group, trajectory_weights(mode, model_tokens, lengths, budget)))
    return [a * weights[i] if i in weights else a for i, a in enumerate(advantages)]
