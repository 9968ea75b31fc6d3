"""What a tree rollout returns: a :class:`RolloutTree`, the one record that flows from the rollout to
the update.

Each prompt is the root of a tree whose other nodes are *segments*: runs of response tokens that one
trajectory wrote before a branch point (or up to its end), each token with its loss mask (1 where the
model wrote it, 0 for a tool result), and the sampler's log-prob and entropy (0 for tool tokens; NaN
for a token the model did not sample, such as the EOS appended after a call past the limit). A
trajectory is a root-to-leaf path: ``path`` lists its segments from the prompt down, and the tokens a
branch shares with its source are held once, in the segments their paths have in common.

The rollout builds the record (``tree.py`` through ``recorder.py``; ``responses.py`` assembles one
from flat per-trajectory data); rewards, advantages (``algo/advantages.py``), packing
(``train/packing.py``) and metrics read it as it is. A trajectory's flat views (``response_ids``,
``loss_mask``, ``logprobs``, ``entropies``) are derived from its path on each access.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(eq=False)
class Segment:
    """A node of a prompt's tree: tokens one after another, each with its loss mask, log-prob and
    entropy. ``start`` is the response offset of its first token (the tokens of its ancestors come
    before it on every path through it)."""

    prompt: int
    parent: Optional[int]
    """The segment before it (an index into ``RolloutTree.segments``); None: it follows the prompt."""
    start: int
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    """The segments after it, in order of first appearance (filled by :meth:`RolloutTree.link`)."""
    trajectories: list[int] = field(default_factory=list)
    """The trajectories whose path holds it (its copies), in order (filled by ``link``)."""

    def __len__(self) -> int:
        return len(self.token_ids)

    def append(self, ids: list[int], mask: int, logprob: float, entropy: float) -> None:
        """Tokens written one after another, all with the same mask, log-prob and entropy."""
        self.token_ids.extend(ids)
        self.loss_mask.extend([mask] * len(ids))
        self.logprobs.extend([logprob] * len(ids))
        self.entropies.extend([entropy] * len(ids))

    def split(self, at: int) -> Segment:
        """Cut at response offset ``at``: this segment keeps the tokens before it, the returned one
        (not yet in a tree) holds the rest."""
        k = at - self.start
        tail = Segment(
            self.prompt,
            None,
            at,
            self.token_ids[k:],
            self.loss_mask[k:],
            self.logprobs[k:],
            self.entropies[k:],
        )
        for name in ("token_ids", "loss_mask", "logprobs", "entropies"):
            del getattr(self, name)[k:]
        return tail


@dataclass(eq=False)
class Trajectory:
    """One root-to-leaf path of a prompt's tree, and how it came to be."""

    tree: RolloutTree = field(repr=False)
    prompt_index: int
    kind: str
    """``initial``, ``branch`` or ``fill``."""
    path: list[int] = field(default_factory=list)
    """Its segments (indices into ``RolloutTree.segments``) from the prompt down."""
    parent: Optional[int] = None
    """Index (in ``RolloutTree.trajectories``) of the trajectory a branch forked from."""
    tool_calls: int = 0
    finish_reason: Optional[str] = None
    """``eos``, ``answer`` (when the protocol stops there), ``limit`` (a call past the limit) or
    ``length``."""

    @property
    def prompt_ids(self) -> list[int]:
        return self.tree.prompts[self.prompt_index]

    @property
    def response_ids(self) -> list[int]:
        return self._joined("token_ids")

    @property
    def loss_mask(self) -> list[int]:
        return self._joined("loss_mask")

    @property
    def logprobs(self) -> list[float]:
        return self._joined("logprobs")

    @property
    def entropies(self) -> list[float]:
        return self._joined("entropies")

    @property
    def response_length(self) -> int:
        return sum(len(self.tree.segments[s]) for s in self.path)

    def _joined(self, name: str) -> list:
        segments = self.tree.segments
        return [x for s in self.path for x in getattr(segments[s], name)]


@dataclass(eq=False)
class RolloutTree:
    """The trees of a step's prompts: ``prompts[p]`` (token ids) is the root of tree p, ``segments``
    its other nodes, ``trajectories`` its root-to-leaf paths (by prompt, then depth first when the
    rollout built it), ``roots[p]`` the segments that follow prompt p, ``stats`` the rollout's
    counters."""

    prompts: list[list[int]]
    segments: list[Segment] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    roots: list[list[int]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def link(self) -> RolloutTree:
        """Fill ``roots``, each segment's ``children`` and ``trajectories`` from the parents and
        paths (children and copies in order of first appearance, as the segments are numbered)."""
        self.roots = [[] for _ in self.prompts]
        for s in self.segments:
            s.children, s.trajectories = [], []
        for u, s in enumerate(self.segments):
            (self.roots[s.prompt] if s.parent is None else self.segments[s.parent].children).append(u)
        for i, t in enumerate(self.trajectories):
            for u in t.path:
                self.segments[u].trajectories.append(i)
        return self

    @property
    def node_tokens(self) -> dict[int, int]:
        """Tokens per segment, by segment index."""
        return {u: len(s) for u, s in enumerate(self.segments)}

    def paths(self) -> list[list[tuple[int, int]]]:
        """Per trajectory, its response as (segment, tokens) pairs."""
        return [[(u, len(self.segments[u])) for u in t.path] for t in self.trajectories]

    @property
    def response_tokens(self) -> int:
        """Response tokens counted per trajectory (a shared token once per path through it)."""
        return sum(len(s) * len(s.trajectories) for s in self.segments)

    @property
    def unique_tokens(self) -> int:
        """Response tokens counted once per segment."""
        return sum(len(s) for s in self.segments)
