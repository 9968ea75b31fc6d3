"""Advantages: GRPO outcome advantages per trajectory, and their attribution to tokens of a rollout tree.

ARPO samples a tree per prompt: trajectories share the tokens written before a branch point. The
rollout's record (``rollout.rollout_tree.RolloutTree``) holds each tree as segments and each
trajectory as its path through them: :func:`tree_advantages` reads it as it is. A tree can also be
described by hand, per trajectory by its *path*, the ordered segments ``(node_id, n_tokens)`` whose
concatenation is that trajectory's response; a shared node appears in the path of every trajectory
that passes through it, always with the same token count and the same predecessor
(:func:`token_advantages` checks that).

Statistics are taken in float64 and returned in float32, so that the result does not depend on the
order in which rewards arrive.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from arpo_fast.rollout.rollout_tree import RolloutTree

SCALES = ("std", "none")
MODES = ("soft", "hard")

Path = Sequence[tuple[int, int]]


def group_advantages(rewards, groups, eps: float = 1e-6, scale: str = "std") -> torch.Tensor:
    """GRPO outcome advantage of each trajectory relative to the others answering the same prompt.

    Args:
        rewards: float tensor [n] (or a list of floats), one scalar reward per trajectory.
        groups: integer tensor [n] (or a list of ints): the prompt each trajectory answers. Ids need
            not be contiguous, sorted, or start at zero.
        eps: added to the group's standard deviation before dividing, >= 0.
        scale: ``"std"`` divides by the group's unbiased standard deviation (``torch.std``), as GRPO
            does; ``"none"`` only subtracts the group mean (Dr. GRPO).

    Returns:
        float32 tensor [n] on the rewards' device: ``(r - mean_g) / (std_g + eps)``. A group of one
        trajectory, or whose rewards are all equal, gets exactly 0.
    """
    r = _as_1d(rewards, "rewards", torch.float64)
    g = _as_1d(groups, "groups", torch.int64, device=r.device)
    if r.shape != g.shape:
        raise ValueError(f"rewards and groups must have the same length; got {r.numel()} and {g.numel()}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}; got {scale!r}")
    if not eps >= 0:  # also rejects NaN
        raise ValueError(f"eps must be >= 0; got {eps}")
    _check_finite(r, "rewards")
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=r.device)

    r = r.double()
    ids, inv = torch.unique(g, return_inverse=True)
    k = ids.numel()
    count = torch.bincount(inv, minlength=k).double()
    mean = torch.zeros(k, dtype=torch.float64, device=r.device).index_add_(0, inv, r) / count
    adv = r - mean[inv]
    if scale == "std":
        sq = torch.zeros_like(mean).index_add_(0, inv, adv * adv)
        std = (sq / (count - 1).clamp_min(1)).sqrt()
        adv = adv / (std[inv] + eps)
    # sum / count can miss an all-equal group's value by an ulp, which eps = 0 would blow up to
    # +-1; the group's spread decides instead.
    lo = torch.full_like(mean, torch.inf).scatter_reduce_(0, inv, r, "amin")
    hi = torch.full_like(mean, -torch.inf).scatter_reduce_(0, inv, r, "amax")
    flat = (count < 2) | (lo == hi)
    return torch.where(flat[inv], 0.0, adv).float()


def token_advantages(seq_advantages, paths: Sequence[Path], mode: str = "soft") -> list[torch.Tensor]:
    """Spread per-trajectory advantages over the tokens of a rollout tree.

    Args:
        seq_advantages: float tensor [n] (or list), one advantage per trajectory, e.g. from
            :func:`group_advantages`.
        paths: n lists of ``(node_id, n_tokens)``; trajectory i's response is its segments in order.
        mode: ``"soft"`` gives every token of trajectory i ``seq_advantages[i]`` (plain GRPO, ARPO's
            default). ``"hard"`` gives a token of node u the mean advantage of the trajectories whose
            path contains u; a node on one path keeps that trajectory's own advantage.

    Returns:
        n float32 tensors, the i-th of length ``sum(n_tokens of path i)``, on seq_advantages' device.
    """
    a = _checked(seq_advantages, mode)
    if len(paths) != a.numel():
        raise ValueError(f"got {len(paths)} paths for {a.numel()} advantages; need one path per trajectory")
    return _spread(a, _Tree.from_paths(paths), mode)


def tree_advantages(seq_advantages, tree: RolloutTree, mode: str = "soft") -> list[torch.Tensor]:
    """:func:`token_advantages` over the rollout's record: trajectory i's path is
    ``tree.trajectories[i].path`` through ``tree.segments``, read as it is (the rollout built it)."""
    a = _checked(seq_advantages, mode)
    if len(tree.trajectories) != a.numel():
        raise ValueError(f"got {len(tree.trajectories)} trajectories for {a.numel()} advantages")
    return _spread(a, _Tree.from_record(tree), mode)


def _checked(seq_advantages, mode: str) -> torch.Tensor:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    a = _as_1d(seq_advantages, "seq_advantages", torch.float64)
    _check_finite(a, "seq_advantages")
    return a


def _spread(a: torch.Tensor, tree: _Tree, mode: str) -> list[torch.Tensor]:
    """Per trajectory of ``tree``, its tokens' advantages (``a``: one per trajectory)."""
    a, dev = a.double(), a.device
    traj = torch.tensor(tree.seg_traj, dtype=torch.int64, device=dev)
    seg_len = torch.tensor(tree.seg_len, dtype=torch.int64, device=dev)
    if mode == "soft":
        seg_val = a[traj]
    else:
        node = torch.tensor(tree.seg_node, dtype=torch.int64, device=dev)
        k = len(tree.node_tokens)
        total = torch.zeros(k, dtype=torch.float64, device=dev).index_add_(0, node, a[traj])
        seg_val = (total / torch.bincount(node, minlength=k))[node]
    flat = torch.repeat_interleave(seg_val.float(), seg_len)
    return list(torch.split(flat, tree.traj_tokens))


def shared_token_count(paths: Sequence[Path]) -> tuple[int, int]:
    """Tokens of a rollout tree counted per trajectory and counted once per node.

    Returns ``(total_tokens, unique_tokens)``: the sum of the paths' lengths, and the sum of the
    distinct nodes' lengths. Their difference is what sharing prefixes saved.
    """
    tree = _Tree.from_paths(paths)
    return sum(tree.traj_tokens), sum(tree.node_tokens)


@dataclass
class _Tree:
    """Validated paths flattened into segment arrays; nodes renumbered 0..k-1 by first appearance."""

    seg_traj: list[int] = field(default_factory=list)
    seg_node: list[int] = field(default_factory=list)
    seg_len: list[int] = field(default_factory=list)
    traj_tokens: list[int] = field(default_factory=list)
    node_tokens: list[int] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: RolloutTree) -> _Tree:
        tree = cls(node_tokens=[len(s) for s in record.segments])
        for i, t in enumerate(record.trajectories):
            tree.seg_traj.extend([i] * len(t.path))
            tree.seg_node.extend(t.path)
            tree.seg_len.extend(tree.node_tokens[u] for u in t.path)
            tree.traj_tokens.append(sum(tree.node_tokens[u] for u in t.path))
        return tree

    @classmethod
    def from_paths(cls, paths: Sequence[Path]) -> _Tree:
        tree = cls()
        # node id -> (index, n_tokens, predecessor id, first trajectory holding it)
        seen: dict[int, tuple[int, int, int | None, int]] = {}
        for i, path in enumerate(paths):
            on_path: set[int] = set()
            prev = None
            length = 0
            for j, seg in enumerate(path):
                node, n = _segment(seg, i, j)
                if node in on_path:
                    raise ValueError(f"node {node} appears twice in the path of trajectory {i}")
                on_path.add(node)
                if node in seen:
                    idx, n0, prev0, i0 = seen[node]
                    if n != n0:
                        raise ValueError(
                            f"node {node} has {n} tokens in trajectory {i} but {n0} in trajectory {i0}"
                        )
                    if prev != prev0:
                        raise ValueError(
                            f"node {node} follows {_name(prev)} in trajectory {i} but {_name(prev0)} in "
                            f"trajectory {i0}; a shared node must have the same prefix in every path"
                        )
                else:
                    idx = len(tree.node_tokens)
                    seen[node] = (idx, n, prev, i)
                    tree.node_tokens.append(n)
                tree.seg_traj.append(i)
                tree.seg_node.append(idx)
                tree.seg_len.append(n)
                length += n
                prev = node
            tree.traj_tokens.append(length)
        return tree


def _segment(seg, i: int, j: int) -> tuple[int, int]:
    try:
        node, n = seg
        node, n = operator.index(node), operator.index(n)
    except (TypeError, ValueError):
        raise ValueError(
            f"segment {j} of trajectory {i} must be a pair of ints (node_id, n_tokens); got {seg!r}"
        ) from None
    if n < 0:
        raise ValueError(f"node {node} in trajectory {i} has negative n_tokens {n}")
    return node, n


def _name(node: int | None) -> str:
    return "the start" if node is None else f"node {node}"


def _as_1d(x, name: str, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A 1-D tensor from a tensor or a list; integer dtype required when ``dtype`` is integral."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.tensor(list(x), dtype=dtype, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name} must be a 1-D tensor or a list of numbers ({exc})") from None
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D [n]; got shape {tuple(x.shape)}")
    if dtype.is_floating_point:
        if x.is_complex():
            raise ValueError(f"{name} must be real; got dtype {x.dtype}")
    elif x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype; got {x.dtype}")
    return x


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not x.dtype.is_floating_point:
        return
    bad = (~torch.isfinite(x)).nonzero().flatten().tolist()
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"{name} must be finite; non-finite values at indices {bad[:10]}{more}")
