"""How the tree rollout writes its :class:`RolloutTree` as it goes.

Each live trajectory writes into its open segment, the last of its path. At a branch point the open
segment is cut where the copies fork: the part before becomes shared (the source and every copy pass
through it), the source goes on in a new segment holding what it wrote past the cut, and each copy
starts a segment of its own. Trajectories and segments are numbered as they are made, which depends
on when tools answer; :meth:`TreeRecorder.finish` renumbers them in an order that does not.
"""

from __future__ import annotations

from collections.abc import Sequence

from arpo_fast.rollout.rollout_tree import RolloutTree, Segment, Trajectory


class TreeRecorder:
    """The record of a rollout being written (``tree``), trajectory by trajectory."""

    def __init__(self, prompts: Sequence[Sequence[int]]):
        self.tree = RolloutTree([list(p) for p in prompts])
        self.lengths: list[int] = []  # response tokens of each trajectory so far

    def _segment(self, prompt: int, parent, start: int) -> int:
        self.tree.segments.append(Segment(prompt, parent, start))
        return len(self.tree.segments) - 1

    def start(self, prompt: int, kind: str) -> int:
        """A new trajectory of ``prompt`` with an empty segment after the prompt; returns its index."""
        path = [self._segment(prompt, None, 0)]
        self.tree.trajectories.append(Trajectory(self.tree, prompt, kind, path))
        self.lengths.append(0)
        return len(self.lengths) - 1

    def append(self, i: int, ids: list[int], mask: int, logprob: float, entropy: float) -> None:
        """Tokens at the end of trajectory ``i`` (see ``Segment.append``)."""
        self.tree.segments[self.tree.trajectories[i].path[-1]].append(ids, mask, logprob, entropy)
        self.lengths[i] += len(ids)

    def branch(self, i: int, at: int, n: int) -> list[int]:
        """``n`` copies of trajectory ``i`` forking at its response offset ``at`` (at or after the
        start of its open segment); returns their indices."""
        t, segments = self.tree.trajectories[i], self.tree.segments
        open_segment = segments[t.path[-1]]
        if at > open_segment.start:  # the open segment up to the branch point becomes shared
            tail = open_segment.split(at)
            tail.parent = t.path[-1]
            segments.append(tail)
            t.path.append(len(segments) - 1)
        shared = t.path[:-1]
        copies = []
        for _ in range(n):
            path = shared + [self._segment(t.prompt_index, shared[-1] if shared else None, at)]
            self.tree.trajectories.append(Trajectory(self.tree, t.prompt_index, "branch", path, parent=i))
            self.lengths.append(at)
            copies.append(len(self.lengths) - 1)
        return copies

    def end(self, i: int, reason: str, tool_calls: int) -> None:
        t = self.tree.trajectories[i]
        t.finish_reason, t.tool_calls = reason, tool_calls

    def finish(self, keys: Sequence, stats: dict[str, int]) -> RolloutTree:
        """The record with trajectories sorted by ``keys`` (one per trajectory) and segments
        numbered by first appearance along them; linked (``RolloutTree.link``)."""
        tree = self.tree
        order = sorted(range(len(tree.trajectories)), key=lambda i: keys[i])
        new_index = {old: new for new, old in enumerate(order)}
        numbers: dict[int, int] = {}
        trajectories = [tree.trajectories[i] for i in order]
        for t in trajectories:
            t.path = [numbers.setdefault(u, len(numbers)) for u in t.path]
            t.parent = None if t.parent is None else new_index[t.parent]
        segments = [tree.segments[old] for old in sorted(numbers, key=lambda u: numbers[u])]
        for s in segments:
            s.parent = None if s.parent is None else numbers[s.parent]
        tree.segments, tree.trajectories, tree.stats = segments, trajectories, stats
        return tree.link()
