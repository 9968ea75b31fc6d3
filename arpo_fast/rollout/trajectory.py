"""What a tree rollout returns: its trajectories (each a path of tree nodes) and counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Trajectory:
    """One finished path of a prompt's tree. Per response token: ``loss_mask`` 1 where the model
    wrote it, 0 for tool results; ``logprobs``/``entropies`` from the sampler (0 for tool tokens).
    ``path`` lists the tree nodes (ids into ``Rollout.node_tokens``) the response is made of. A token
    the model did not sample (the EOS appended after a call past the limit) has NaN log-prob and
    entropy."""

    prompt_index: int
    prompt_ids: list[int]
    kind: str
    """``initial``, ``branch`` or ``fill``."""
    parent: Optional[int] = None
    """Index (in ``Rollout.trajectories``) of the trajectory a branch forked from."""
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    path: list[int] = field(default_factory=list)
    tool_calls: int = 0
    finish_reason: Optional[str] = None
    """``eos``, ``answer`` (when the protocol stops there), ``limit`` (a call past the limit) or
    ``length``."""


@dataclass
class Rollout:
    """The trajectories of every prompt, the tree nodes and counters."""

    trajectories: list[Trajectory]
    node_tokens: dict[int, int]
    stats: dict[str, int]

    def paths(self) -> list[list[tuple[int, int]]]:
        """Per trajectory, its response as (node id, tokens) segments (for advantage attribution)."""
        return [[(n, self.node_tokens[n]) for n in t.path] for t in self.trajectories]
