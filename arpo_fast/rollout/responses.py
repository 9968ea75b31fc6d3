"""A :class:`RolloutTree` from trajectories written out flat: each with its whole response, and the
tree nodes (``path``, with their sizes in ``node_tokens``) it is made of, as another rollout, a file
or a test may give them. Unlike the rollout's own record, such input is checked: a node must hold
the same tokens, after the same prefix, in every trajectory that passes through it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from arpo_fast.rollout.rollout_tree import RolloutTree, Segment, Trajectory


@dataclass
class Response:
    """One trajectory, flat. ``logprobs`` and ``entropies``: per response token, or empty when not
    known (NaN then). ``path``: the node ids its response is made of (empty: a node of its own)."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    path: list[int] = field(default_factory=list)
    kind: str = "initial"
    parent: Optional[int] = None
    tool_calls: int = 0
    finish_reason: Optional[str] = None


def assemble_tree(
    responses: Sequence[Response], node_tokens: Optional[Mapping[int, int]] = None
) -> RolloutTree:
    """The record of ``responses``: with ``node_tokens`` (tokens per node id) the nodes their paths
    name are shared, numbered by first appearance; without, each response is one node after its
    prompt. Raises ValueError, naming the trajectories, where responses disagree."""
    tree = RolloutTree(_prompts(responses))
    index: dict[object, int] = {}  # node id -> segment
    holder: list[int] = []  # per segment, the first trajectory through it
    for i, r in enumerate(responses):
        _check_lengths(r, i)
        nodes = r.path if node_tokens is not None and r.path else [None]
        path: list[int] = []
        offset = 0
        for node in nodes:
            key = ("own", i) if node is None else node
            if key in index and index[key] in path:
                raise ValueError(f"node {node} appears twice in the path of trajectory {i}")
            n = len(r.response_ids) if node is None or node_tokens is None else _size(node_tokens, node, i)
            if key in index:
                _check_shared(
                    responses, tree.segments[index[key]], (holder[index[key]], i), node, path, offset
                )
            else:
                index[key] = len(tree.segments)
                holder.append(i)
                tree.segments.append(_segment(r, path[-1] if path else None, offset, n))
            path.append(index[key])
            offset += n
        if offset != len(r.response_ids):
            raise ValueError(
                f"trajectory {i}: its path's nodes hold {offset} tokens, its response {len(r.response_ids)}"
            )
        tree.trajectories.append(
            Trajectory(tree, r.prompt_index, r.kind, path, r.parent, r.tool_calls, r.finish_reason)
        )
    return tree.link()


def _prompts(responses: Sequence[Response]) -> list[list[int]]:
    prompts: dict[int, tuple[int, list[int]]] = {}
    for i, r in enumerate(responses):
        first, prompt = prompts.setdefault(r.prompt_index, (i, list(r.prompt_ids)))
        if prompt != list(r.prompt_ids):
            raise ValueError(
                f"trajectories {first} and {i} of prompt {r.prompt_index} have different prompt tokens"
            )
    if any(p < 0 for p in prompts):
        raise ValueError(f"prompt indices must be >= 0, got {min(prompts)}")
    return [prompts[p][1] if p in prompts else [] for p in range(max(prompts, default=-1) + 1)]


def _size(node_tokens: Mapping[int, int], node, i: int) -> int:
    if node not in node_tokens:
        raise ValueError(f"node {node} of trajectory {i} has no size in node_tokens")
    return int(node_tokens[node])


def _check_lengths(r: Response, i: int) -> None:
    n = len(r.response_ids)
    for name in ("loss_mask", "logprobs", "entropies"):
        values = getattr(r, name)
        if len(values) != n and (name == "loss_mask" or values):
            raise ValueError(f"trajectory {i}: {len(values)} {name} for {n} response tokens")


def _segment(r: Response, parent: Optional[int], start: int, n: int) -> Segment:
    span = slice(start, start + n)
    unknown = [math.nan] * n
    return Segment(
        r.prompt_index,
        parent,
        start,
        list(r.response_ids[span]),
        list(r.loss_mask[span]),
        list(r.logprobs[span]) if r.logprobs else unknown,
        list(r.entropies[span]) if r.entropies else list(unknown),
    )


def _check_shared(
    responses, segment: Segment, pair: tuple[int, int], node, path: list[int], offset: int
) -> None:
    """Trajectory ``i`` (``pair``: the first trajectory through ``segment``, then ``i``) reaches
    ``segment`` (node id ``node``) after the segments ``path``, at response offset ``offset``."""
    first, i = pair
    if segment.parent != (path[-1] if path else None) or segment.start != offset:
        raise ValueError(f"node {node} follows another prefix in trajectory {i} than in trajectory {first}")
    r, span = responses[i], slice(segment.start, segment.start + len(segment))
    if r.response_ids[span] != segment.token_ids or r.loss_mask[span] != segment.loss_mask:
        raise ValueError(f"node {node} holds other tokens in trajectory {i} than in trajectory {first}")
