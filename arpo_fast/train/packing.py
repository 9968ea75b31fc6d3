"""Tree-packed micro-batches: every token of a prompt's rollout tree goes through the model once.

The trajectories of a prompt share the prompt, and a branch shares everything its source wrote
before the fork: the rollout's record (``rollout.rollout_tree.RolloutTree``) holds each prompt's
tree as segments, each trajectory as its path through them. The per-trajectory update recomputes
each shared token once per copy; here a tree is laid out once, depth first: the prompt, then each
segment right after its parent (a node's subtree is contiguous)::

    [prompt][a ...][a1 ...][a2 ...][b ...]      a1 and a2 fork from a; b from the prompt

**Mask.** A token sees its own node causally and all of its ancestors, nothing else. In
depth-first order that is one integer per token, the end of its node's subtree: key j is visible
to query i iff ``j <= i < subtree_end[j]``. **Positions** are each token's depth along its own
path (prompt length + offset in the response), exactly what the model saw in the rollout.

**Micro-batches.** Several trees share one packed row, with no padding, as long as their tokens fit
``budget`` (``--micro-batch-tokens``). A larger tree is split into groups of trajectories; each
group carries every ancestor of its nodes as context, so its layout is the union of its
trajectories' paths and stays within the budget. Groups take whole subtrees of the prompt where
they fit, else runs of depth-first consecutive paths. A node's loss counts in the first group that
holds it (each token's loss exactly once); elsewhere it is context only. Only a single path longer
than the budget exceeds it (it goes alone, as in the per-trajectory update). Pieces go into
micro-batches first-fit by decreasing size.

**Prompt context.** The groups of a split tree all begin with its prompt. With ``context`` (the
default), a group lays out only the prompt's last token; the rest of the prompt is a
:class:`PromptContext`, run through the model once for the whole tree, whose keys and values every
token of the group attends to in front of the row (``tree_batch.TreeBatch.contexts``; the update
carries their gradients back through that one run). So no prompt token goes through the model twice.

**Copies.** A predicted token stands for every trajectory through its node: its advantages reach
the loss as sums over those copies (``arpo_fast.algo.CopyAdvantages``), which is exact because the
copies share one log-prob (``algo/loss.py``, ``shared_policy_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from arpo_fast.algo import CopyAdvantages
from arpo_fast.rollout.rollout_tree import RolloutTree, Segment
from arpo_fast.train.tree_batch import PromptContext, TreeBatch


@dataclass
class _Node:
    segment: Optional[Segment]  # the record's segment it lays out (None: the prompt)
    first: int  # the first trajectory through it
    start: int  # offset in the response (0 for the prompt)
    length: int
    parent: int  # index in Tree.nodes, -1 for the prompt
    trajs: list[int] = field(default_factory=list)  # trajectories through it: its copies
    children: list[int] = field(default_factory=list)


@dataclass
class Tree:
    """A prompt's tree as one layout unit: ``nodes[0]`` is the prompt, the others the record's
    segments; ``paths`` are (trajectory, node indices from the prompt on), in depth-first order of
    their last node."""

    prompt: list[int]
    nodes: list[_Node]
    paths: list[tuple[int, list[int]]]

    @property
    def size(self) -> int:
        return sum(n.length for n in self.nodes)


def build_trees(record: RolloutTree, rows: Sequence[int], share: bool = True) -> list[Tree]:
    """The layout units of the record's trajectories ``rows``: per prompt its tree, the segments on
    those trajectories' paths (``share``), or one chain per trajectory (segments laid out again for
    each trajectory through them)."""
    if not share:
        return [_chain(record, i) for i in rows]
    members: dict[int, list[int]] = {}
    for i in rows:
        members.setdefault(record.trajectories[i].prompt_index, []).append(i)
    return [_prompt_tree(record, p, group) for p, group in members.items()]


def _root(record: RolloutTree, p: int, rows: list[int]) -> _Node:
    prompt = record.prompts[p]
    if not prompt:
        raise ValueError(
            f"trajectory {rows[0]} has an empty prompt; the update needs at least one "
            "prompt token to predict the first response token"
        )
    return _Node(None, rows[0], 0, len(prompt), -1, list(rows))


def _prompt_tree(record: RolloutTree, p: int, rows: list[int]) -> Tree:
    """Prompt ``p``'s tree over the trajectories ``rows`` (all of its trajectories, in practice)."""
    index: dict[int, int] = {}  # segment -> node, numbered by first appearance
    for i in rows:
        for u in record.trajectories[i].path:
            index.setdefault(u, len(index) + 1)
    nodes, kept = [_root(record, p, rows)], set(rows)
    for u in index:
        s = record.segments[u]
        trajs = [i for i in s.trajectories if i in kept]
        parent = 0 if s.parent is None else index[s.parent]
        nodes.append(_Node(s, trajs[0], s.start, len(s), parent, trajs))
        nodes[parent].children.append(len(nodes) - 1)
    paths = [(i, [0] + [index[u] for u in record.trajectories[i].path]) for i in rows]
    order = {u: k for k, u in enumerate(_preorder(nodes))}
    paths.sort(key=lambda path: order[path[1][-1]])
    return Tree(record.prompts[p], nodes, paths)


def _chain(record: RolloutTree, i: int) -> Tree:
    """Trajectory ``i`` alone: its prompt, then its segments one after another."""
    t = record.trajectories[i]
    nodes = [_root(record, t.prompt_index, [i])]
    for k, u in enumerate(t.path, 1):
        s = record.segments[u]
        nodes.append(_Node(s, i, s.start, len(s), k - 1, [i]))
        nodes[k - 1].children.append(k)
    return Tree(t.prompt_ids, nodes, [(i, list(range(len(nodes))))])


def _preorder(nodes: list[_Node], keep=None, root: int = 0) -> list[int]:
    """Node indices of ``root``'s subtree (default: the whole tree, from the prompt) in depth-first
    order, children in order of appearance; with ``keep`` (a set of nodes closed under ancestors)
    only those."""
    out, stack = [], [root]
    while stack:
        u = stack.pop()
        out.append(u)
        stack.extend(c for c in reversed(nodes[u].children) if keep is None or c in keep)
    return out


@dataclass
class _Piece:
    tree: Tree
    nodes: set[int]  # laid out: the union of some paths (closed under ancestors)
    owned: set[int]  # whose loss counts here
    size: int  # tokens laid out in the row
    context: Optional[PromptContext] = None  # the prompt but its last token, run apart


def split_tree(tree: Tree, budget: int, context: bool = True) -> list[_Piece]:
    """The tree whole if it fits ``budget`` tokens. Else the prompt's subtrees go first-fit into
    groups that each begin with the prompt; a subtree too big for any group is cut into runs of
    consecutive (depth-first) paths, each carrying its ancestors. A node is owned by the first
    group holding it. With ``context`` (and a prompt longer than one token) the groups share one
    :class:`PromptContext` and each lays out only the prompt's last token."""
    everything = set(range(len(tree.nodes)))
    if tree.size <= budget:
        return [_Piece(tree, everything, everything, tree.size)]
    shared = context and tree.nodes[0].length > 1
    prompt = 1 if shared else tree.nodes[0].length  # prompt tokens a group lays out
    units = [set(_preorder(tree.nodes, root=c)) for c in tree.nodes[0].children]
    sizes = [sum(tree.nodes[u].length for u in unit) for unit in units]
    fits = [i for i, size in enumerate(sizes) if prompt + size <= budget]
    groups = [
        ({0}.union(*(units[fits[i]] for i in b)), prompt + sum(sizes[fits[i]] for i in b))
        for b in _first_fit([sizes[i] for i in fits], budget - prompt)
    ]
    for i in sorted(set(range(len(units))) - set(fits)):
        groups += _path_runs(tree, [p for _, p in tree.paths if p[1] in units[i]], budget, prompt)
    carried = PromptContext(_long(tree.prompt[:-1]), len(groups)) if shared else None
    pieces: list[_Piece] = []
    seen: set[int] = set()
    for nodes, size in groups:
        pieces.append(_Piece(tree, nodes, nodes - seen, size, carried))
        seen |= nodes
    return pieces


def _path_runs(tree: Tree, paths: list[list[int]], budget: int, prompt: int) -> list[tuple[set[int], int]]:
    """Runs of consecutive paths whose union (ancestors included, ``prompt`` tokens of the prompt)
    fits ``budget`` tokens (a single longer path makes a run of its own)."""
    runs: list[tuple[set[int], int]] = []
    current: set[int] = set()
    size = 0

    def tokens(nodes) -> int:
        return sum(prompt if u == 0 else tree.nodes[u].length for u in nodes)

    for path in paths:
        new = [u for u in path if u not in current]
        extra = tokens(new)
        if current and size + extra > budget:
            runs.append((current, size))
            current, size = set(), 0
            new, extra = path, tokens(path)
        current.update(new)
        size += extra
    return runs + [(current, size)]


def _first_fit(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices into ``sizes`` grouped first-fit by decreasing size into bins of ``budget``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        b = next((b for b in range(len(bins)) if sizes[i] <= room[b]), None)
        if b is None:
            bins.append([])
            room.append(budget)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= sizes[i]
    return [sorted(b) for b in bins]


def pack_trees(
    record: RolloutTree,
    advantages: Sequence[torch.Tensor],
    rows: Sequence[int],
    budget: int,
    share: bool = True,
    context: bool = True,
) -> list[TreeBatch]:
    """The micro-batches of the record's trajectories ``rows`` (host tensors; see the module
    docstring).

    ``advantages``: per trajectory (indexed like ``record.trajectories``), fp32 [len(response)]; a
    token's copies bring theirs together (``CopyAdvantages``). ``share``: trees (else one chain per
    trajectory). ``context``: split trees share their prompt as a :class:`PromptContext` (else each
    group lays the prompt out again)."""
    pieces = [
        p for tree in build_trees(record, rows, share) for p in split_tree(tree, budget, context and share)
    ]
    return [_layout([pieces[i] for i in b], advantages) for b in _first_fit([p.size for p in pieces], budget)]


class _Row:
    """Accumulates one packed row: tokens as Python lists, predicted nodes as spans; converted to
    tensors once per row (``torch.tensor`` of a list is several times slower than numpy's)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.end: list[int] = []
        self.nodes: list[tuple[int, int, int, int, int]] = []  # (row start, tokens, before, traj, offset)
        self.mask: list[int] = []
        self.rollout: list[float] = []
        self.copies: list[CopyAdvantages] = []
        self.path_keys: list[tuple[int, np.ndarray]] = []  # (context number or -1, row positions)
        self.path_sizes: list[tuple[int, int]] = []
        self.starts: list[int] = []
        self.contexts: list[PromptContext] = []
        self.context_spans: list[tuple[int, int]] = []  # the row positions each context is seen from


def _layout(pieces: list[_Piece], advantages) -> TreeBatch:
    row = _Row()
    for piece in pieces:
        row.starts.append(len(row.ids))
        _lay_piece(row, piece, advantages)
    row.starts.append(len(row.ids))
    ids = _long(row.ids)
    at, hidden, origin = _predicted(row.nodes)
    keep = torch.from_numpy(np.array(row.mask, dtype=bool)).nonzero().flatten()  # model-written only
    copies = CopyAdvantages.cat(row.copies).select(keep)
    sizes = [c.tokens for c in row.contexts]
    offsets, C = np.cumsum([0] + sizes[:-1], dtype=np.int64), sum(sizes)
    path_keys = [
        keys + C if c < 0 else np.concatenate([np.arange(offsets[c], offsets[c] + sizes[c]), keys + C])
        for c, keys in row.path_keys
    ]
    bounds = np.repeat(np.array(row.context_spans, dtype=np.int64).reshape(-1, 2), sizes, axis=0)
    return TreeBatch(
        input_ids=ids,
        position_ids=_long(row.pos),
        subtree_end=_long(row.end),
        hidden_index=hidden[keep],
        targets=ids[at[keep]],
        copies=copies,
        rollout_logprobs=torch.from_numpy(np.array(row.rollout, dtype=np.float32))[keep],
        origin=origin[keep],
        path_sizes=[
            (K + (sizes[c] if c >= 0 else 0), q) for (c, _), (K, q) in zip(row.path_keys, row.path_sizes)
        ],
        path_keys=torch.from_numpy(np.concatenate(path_keys or [np.zeros(0, np.int64)])),
        piece_starts=row.starts,
        model_tokens=int(copies.count.sum()),
        contexts=row.contexts,
        context_lo=torch.from_numpy(bounds[:, 0].copy()),
        context_hi=torch.from_numpy(bounds[:, 1].copy()),
    )


def _predicted(nodes: list[tuple[int, int, int, int, int]]) -> tuple[torch.Tensor, ...]:
    """For every token of the predicted nodes (``_Row.nodes``): its row position, the row position
    whose hidden state predicts it (the previous one, or for a node's first token the last token
    before the node on its path), and its (trajectory, response offset)."""
    start, size, before, traj, offset = (
        (np.array(c, dtype=np.int64).reshape(-1) for c in zip(*nodes))
        if nodes
        else (np.zeros(0, dtype=np.int64),) * 5
    )
    within = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)  # index inside its node
    at = np.repeat(start, size) + within
    hidden = np.where(within == 0, np.repeat(before, size), at - 1)
    origin = np.stack([np.repeat(traj, size), np.repeat(offset, size) + within], axis=1)
    return torch.from_numpy(at), torch.from_numpy(hidden), torch.from_numpy(origin)


def _long(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))


def _lay_piece(row: _Row, piece: _Piece, advantages) -> None:
    tree, prompt_len = piece.tree, len(piece.tree.prompt)
    spans: dict[int, tuple[int, int]] = {}
    last: dict[int, int] = {}  # node -> row index of the last token on its path so far
    order = _preorder(tree.nodes, piece.nodes)
    first = len(row.ids)
    for u in order:
        node = tree.nodes[u]
        a = len(row.ids)
        if u == 0:
            laid = 1 if piece.context is not None else prompt_len  # the rest is the context
            row.ids.extend(tree.prompt[prompt_len - laid :])
            row.pos.extend(range(prompt_len - laid, prompt_len))
        else:
            assert node.segment is not None, "only the prompt (node 0) has no segment"
            row.ids.extend(node.segment.token_ids)
            row.pos.extend(range(prompt_len + node.start, prompt_len + node.start + node.length))
        spans[u] = (a, len(row.ids))
        last[u] = len(row.ids) - 1 if node.length else last[node.parent]
        if u in piece.owned and u != 0 and node.length:
            _predict(row, node, a, last[node.parent], advantages)
    subtree_end = dict((u, spans[u][1]) for u in order)
    for u in reversed(order):  # children come after their parent in preorder
        p = tree.nodes[u].parent
        if p >= 0:
            subtree_end[p] = max(subtree_end[p], subtree_end[u])
    for u in order:
        a, b = spans[u]
        row.end.extend([subtree_end[u]] * (b - a))
    context = -1
    if piece.context is not None:
        context = len(row.contexts)
        row.contexts.append(piece.context)
        row.context_spans.append((first, len(row.ids)))
    _paths(row, piece, spans, context)


def _paths(row: _Row, piece: _Piece, spans: dict[int, tuple[int, int]], context: int) -> None:
    """Each path of the piece as keys (after the ``context``'s, if any), its nodes no earlier path
    covered as its queries (in depth-first order these are the path's last nodes)."""
    covered: set[int] = set()
    for _, path in piece.tree.paths:
        if not piece.nodes.issuperset(path) or covered.issuperset(path):
            continue
        keys = np.concatenate([np.arange(*spans[u]) for u in path])
        queries = sum(spans[u][1] - spans[u][0] for u in path if u not in covered)
        covered.update(path)
        if queries:
            row.path_keys.append((context, keys))
            row.path_sizes.append((len(keys), queries))


def _predict(row: _Row, node: _Node, a: int, before: int, advantages) -> None:
    """The tokens of ``node`` (laid out from row index ``a``; ``before``: the row index of the token
    before its first one) as predictions, with their copies' advantages; ``_layout`` keeps the
    model-written ones."""
    assert node.segment is not None, "the prompt (node 0) predicts none of its tokens"
    s, e = node.start, node.start + node.length
    row.nodes.append((a, e - s, before, node.first, s))
    row.mask.extend(node.segment.loss_mask)
    row.rollout.extend(node.segment.logprobs)
    row.copies.append(CopyAdvantages.of(torch.stack([advantages[i][s:e] for i in node.trajs])))
