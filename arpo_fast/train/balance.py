"""Which rank trains on which trajectories: a mini-batch's work spread over every rank by tokens.

Each rank rolls out its own prompts (``distributed.py``), but a mini-batch holds only
``--mini-batch-prompts`` of them: left where they were rolled out, the trees of a mini-batch would
sit on a few ranks while the others ran stand-ins, and trees of different sizes would make every
rank wait for the largest. Instead every rank plans, from the same small description of every
rank's trees (:class:`Shape`: each path's nodes and their token counts, no tokens themselves), the
same split of each mini-batch over all W ranks (``exchange.py`` then moves the trajectories).

**The cut.** A mini-batch's trees are laid end to end (by the prompts' places in the step), each
tree's paths in depth-first order, and cut into at most W consecutive runs, run j for rank j, each
of at most C tokens, C the smallest size at which that works (bisection). Trees go whole while
they fit what is left of a run, and start the next run when they fit an empty one: trees stay
whole where they fit. A tree larger than C is split between paths: a part that starts a run lays
out the prompt and the shared segments above it again (so the split costs those tokens, counted
in C), and each copy of a shared token still counts once in the loss, since its copies are divided
between the ranks and ``algo.shared_policy_loss`` is a sum over copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from arpo_fast.rollout.rollout_tree import RolloutTree
from arpo_fast.train.packing import build_trees


@dataclass
class Shape:
    """A layout unit as the plan sees it: a prompt's tree (one trajectory's chain where trees are
    not shared), held by ``rank``, at ``position`` in the step's prompts; ``paths`` in depth-first
    order as (trajectory on its rank, [(node, tokens), ...] from the prompt down)."""

    rank: int
    position: int
    paths: list[tuple[int, list[tuple[int, int]]]]


def shapes(record: RolloutTree, rows: Sequence[int], share: bool, rank: int, positions) -> list[Shape]:
    """The shapes of trajectories ``rows`` of this rank's ``record`` (``share``: trees, else
    chains; ``positions[p]``: the step position of the record's prompt p)."""
    out = []
    for tree in build_trees(record, rows, share):
        first = record.trajectories[tree.paths[0][0]].prompt_index
        paths = [(i, [(u, tree.nodes[u].length) for u in nodes]) for i, nodes in tree.paths]
        out.append(Shape(rank, positions[first], paths))
    return out


@dataclass
class Plan:
    """One mini-batch's split: per rank, its pieces as (index into the shapes, trajectories of that
    shape's rank), and the tokens it lays out (``loads``)."""

    pieces: list[list[tuple[int, list[int]]]]
    loads: list[int]

    @property
    def idle(self) -> int:
        """Ranks with nothing to do (while another has work)."""
        return sum(load == 0 for load in self.loads) if any(self.loads) else 0


@dataclass
class _Line:
    """Every path of a mini-batch, end to end: its shape and place in it, the tokens it adds to its
    tree's layout (``new``), and those a part of the tree starting at it lays out again
    (``repeated``: the prompt and the shared segments above it; 0 for a tree's first path)."""

    shape: list[int]
    path: list[int]
    new: list[int]
    repeated: list[int]
    trees: list[tuple[int, int]]  # each shape's paths: [first, end)


def _line(units: Sequence[Shape]) -> _Line:
    line = _Line([], [], [], [], [])
    for s, unit in enumerate(units):
        seen: set[int] = set()
        line.trees.append((len(line.shape), len(line.shape) + len(unit.paths)))
        for j, (_, nodes) in enumerate(unit.paths):
            line.shape.append(s)
            line.path.append(j)
            line.new.append(sum(t for u, t in nodes if u not in seen))
            line.repeated.append(sum(t for u, t in nodes if u in seen))
            seen.update(u for u, _ in nodes)
    return line


def _fill(line: _Line, cap: int) -> list[int]:
    """Where the runs start when each holds at most ``cap`` tokens: whole trees while they fit a
    run (a tree that does not fit what is left of one starts the next), a tree larger than ``cap``
    path by path, a part that starts a run laying out its ``repeated`` tokens again."""
    starts, load = [0], 0
    for a, b in line.trees:
        size = sum(line.new[a:b])
        if load + size <= cap:
            load += size
            continue
        if size <= cap:
            starts.append(a)
            load = size
            continue
        for g in range(a, b):
            if load + line.new[g] + (starts[-1] == g) * line.repeated[g] > cap:
                starts.append(g)
                load = line.repeated[g]
            load += line.new[g]
    return [g for k, g in enumerate(starts) if k == 0 or g > starts[k - 1]]


def plan(units: Sequence[Shape], world: int) -> Plan:
    """The split of one mini-batch's ``units`` (in step order) over ``world`` ranks: the smallest
    run size (by bisection) at which :func:`_fill` needs at most ``world`` runs."""
    line = _line(units)
    n = len(line.shape)
    lo = max((line.new[g] + line.repeated[g] for g in range(n)), default=0)  # a path alone
    hi = max(sum(line.new), lo)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_fill(line, mid)) <= world:
            hi = mid
        else:
            lo = mid + 1
    starts = _fill(line, lo) if n else [0]
    cuts = starts + [n] * (world + 1 - len(starts))
    pieces: list[list[tuple[int, list[int]]]] = []
    loads = []
    for a, b in zip(cuts, cuts[1:]):
        mine: dict[int, list[int]] = {}
        for g in range(a, b):
            mine.setdefault(line.shape[g], []).append(g)
        pieces.append([(s, [units[s].paths[line.path[g]][0] for g in gs]) for s, gs in mine.items()])
        loads.append(sum(_tokens(units[s], [line.path[g] for g in gs]) for s, gs in mine.items()))
    return Plan(pieces, loads)


def _tokens(unit: Shape, paths: list[int]) -> int:
    """Tokens laid out for the union of ``paths`` of ``unit``."""
    nodes = {u: t for j in paths for u, t in unit.paths[j][1]}
    return sum(nodes.values())


def balance(plans: Sequence[Plan]) -> float:
    """The slowest rank's tokens over the mean, over a step's mini-batches (each one waits for its
    slowest rank, so their maxima add up): 1 is perfect balance, W one rank doing everything."""
    slowest = sum(max(p.loads, default=0) for p in plans)
    mean = sum(sum(p.loads) / max(len(p.loads), 1) for p in plans)
    return slowest / mean if mean else 1.0
