"""ARPO tree rollout: entropy-guided branching after tool calls, on the paged-KV engine.

Per prompt, ``initial`` (N) trajectories start, out of a budget of ``rollouts`` (M). Each decodes
until it closes a tool tag, answers, ends (EOS) or reaches ``max_response_tokens``. A tool call goes
to the executor and its trajectory waits while every other trajectory keeps decoding: there are no
global rounds. The result comes back as tokens with loss mask 0.

Branching: the ``entropy_tokens`` (k) tokens after a tool result give H_t, the mean entropy of the
sampled distributions over those tokens; H_init is the same mean over the trajectory's first k
tokens (a branch keeps its source's). Both are divided by ln V. With u ~ U(0, 1) the trajectory
branches when clip(u - entropy_weight * (H_t - H_init), 0, 1) <= threshold, that is with probability
clip(threshold + entropy_weight * dH, 0, 1): ``branches - 1`` copies fork right after the tool
result, sharing its KV blocks (no copy, no recompute), and sample their own continuations. When
every trajectory of a prompt has finished with budget left, the rest start fresh, all at once.

Compared with the reference implementation (see DESIGN.md): H_t is measured right after the result
the branches restart from (not one call earlier), the baseline is the trajectory's own and so is
never stale, the first call's decision uses a real dH, and entropies are of the full distribution.
Its top-10 entropy estimate is not available here.

Every draw is a function of (rollout seed, prompt, trajectory, position): the same seed gives the
same trajectories whatever order the tools finish in, up to the model's own float arithmetic.
"""

from __future__ import annotations

import math
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from arpo_fast.engine.params import SamplingParams
from arpo_fast.rollout.engine_api import RolloutEngine
from arpo_fast.rollout.protocol import Protocol, TrajectoryProtocol
from arpo_fast.seeds import MAX_SEED, child_seed
from arpo_fast.settings import setting


@dataclass(frozen=True)
class ARPOConfig:
    """Tree-rollout settings (defaults: the reference's reasoning runs)."""

    rollouts: int = setting(16, "M: trajectories per prompt, branches and fresh fills included (the GRPO "
                            "group size).")
    initial: int = setting(8, "N: trajectories started per prompt before any branching.")
    branches: int = setting(2, "Z: paths after a branch point (the trajectory and Z - 1 copies).")
    entropy_tokens: int = setting(20, "k: tokens after a tool result (and at the start) whose mean "
                                  "entropy is compared.")
    threshold: float = setting(0.5, "tau: the branch probability when the entropy did not change.")
    entropy_weight: float = setting(0.2, "beta: how much a normalised entropy rise raises the branch "
                                    "probability.")
    max_response_tokens: int = setting(4096, "Tokens after the prompt, tool results included; a longer "
                                       "trajectory ends as ``length``.")

    def __post_init__(self):
        if not 1 <= self.initial <= self.rollouts:
            raise ValueError(f"need 1 <= initial <= rollouts, got initial={self.initial}, "
                             f"rollouts={self.rollouts}")
        if self.branches < 2:
            raise ValueError(f"branches must be >= 2 (a branch point makes Z paths), got {self.branches}")
        if self.entropy_tokens < 1:
            raise ValueError(f"entropy_tokens must be >= 1, got {self.entropy_tokens}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not math.isfinite(self.entropy_weight):
            raise ValueError(f"entropy_weight must be finite, got {self.entropy_weight}")
        if self.max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")


@dataclass
class Trajectory:
    """One finished path of a prompt's tree. Per response token: ``loss_mask`` 1 where the model
    wrote it, 0 for tool results; ``logprobs``/``entropies`` from the sampler (0 for tool tokens).
    ``path`` lists the tree nodes (ids into ``Rollout.node_tokens``) the response is made of."""

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
    """``answer``, ``eos``, ``limit`` (a call past the limit) or ``length``."""


@dataclass
class Rollout:
    """The trajectories of every prompt, the tree nodes and counters."""

    trajectories: list[Trajectory]
    node_tokens: dict[int, int]
    stats: dict[str, int]

    def paths(self) -> list[list[tuple[int, int]]]:
        """Per trajectory, its response as (node id, tokens) segments (for advantage attribution)."""
        return [[(n, self.node_tokens[n]) for n in t.path] for t in self.trajectories]


@dataclass
class _Probe:
    at: int                       # response length right after the tool result
    protocol: TrajectoryProtocol  # the protocol state there, for the copies
    entropies: list[float] = field(default_factory=list)


@dataclass
class _Live:
    seq: int
    key: int                      # for this trajectory's branch draws
    protocol: TrajectoryProtocol
    node_start: int = 0           # response index where the open (last) node of the path starts
    first: list[float] = field(default_factory=list)
    h_init: Optional[float] = None
    probe: Optional[_Probe] = None
    copies: int = 0


def _uniform(key: int, index: int) -> float:
    return child_seed(key, index) / (MAX_SEED + 1)


class _TreeRollout:
    def __init__(self, engine: RolloutEngine, protocol: Protocol, executor, config: ARPOConfig,
                 sampling: SamplingParams, seed: int):
        self.engine, self.protocol, self.executor = engine, protocol, executor
        self.config, self.sampling, self.seed = config, sampling, seed
        self.log_v = math.log(max(int(engine.vocab_size), 2))
        self.trajs: list[Trajectory] = []
        self.names: list[tuple[int, ...]] = []  # (start index, copy index, copy index, ...)
        self.live: dict[int, _Live] = {}
        self.active: dict[int, None] = {}   # ordered set of trajectories ready to decode
        self.waiting: dict[int, Future] = {}   # identical calls may share one future
        self.created: list[int] = []
        self.open: list[int] = []
        self.node_tokens: dict[int, int] = {}
        self.stats = dict.fromkeys(("branch_points", "branch_copies", "fills", "tool_calls",
                                    "model_tokens", "tool_tokens", "steps"), 0)

    # ------------------------------------------------------------------ lifecycle
    def run(self, prompts: Sequence[Sequence[int]]) -> Rollout:
        self.prompts = [list(p) for p in prompts]
        self.created, self.open = [0] * len(prompts), [0] * len(prompts)
        for p in range(len(prompts)):
            self._start(p, self.config.initial, "initial")
        while self.active or self.waiting:
            self._collect(block=not self.active)
            if self.active:
                self._step()
        return self._ordered()

    def _ordered(self) -> Rollout:
        """The result in an order that does not depend on when tools finished: by prompt, then
        depth first (a trajectory, then its branches), nodes numbered by first appearance."""
        order = sorted(range(len(self.trajs)), key=lambda i: (self.trajs[i].prompt_index, self.names[i]))
        new_index = {old: new for new, old in enumerate(order)}
        nodes: dict[int, int] = {}
        trajs = []
        for i in order:
            t = self.trajs[i]
            t.path = [nodes.setdefault(n, len(nodes)) for n in t.path]
            t.parent = None if t.parent is None else new_index[t.parent]
            trajs.append(t)
        node_tokens = {nodes[n]: k for n, k in self.node_tokens.items()}
        return Rollout(trajs, dict(sorted(node_tokens.items())), self.stats)

    def release(self) -> None:
        """Free whatever is still held (after an error): the engine's pool is left as found."""
        for live in self.live.values():
            self.engine.free(live.seq)
        self.live.clear()
        for future in self.waiting.values():
            future.cancel()

    def _new_node(self) -> int:
        node = len(self.node_tokens)
        self.node_tokens[node] = 0
        return node

    def _start(self, p: int, n: int, kind: str) -> None:
        for _ in range(n):
            key = child_seed(child_seed(self.seed, p), self.created[p])
            self.names.append((self.created[p],))
            self.created[p] += 1
            self.open[p] += 1
            seq = self.engine.add(self.prompts[p], key)
            i = len(self.trajs)
            self.trajs.append(Trajectory(p, self.prompts[p], kind, path=[self._new_node()]))
            self.live[i] = _Live(seq, key, self.protocol.new_trajectory())
            self.active[i] = None
        if kind == "fill":
            self.stats["fills"] += n

    def _finish(self, i: int, reason: str) -> None:
        t, live = self.trajs[i], self.live.pop(i)
        t.finish_reason, t.tool_calls = reason, live.protocol.calls
        self.node_tokens[t.path[-1]] = len(t.response_ids) - live.node_start
        self.active.pop(i, None)
        self.engine.free(live.seq)
        p = t.prompt_index
        self.open[p] -= 1
        left = self.config.rollouts - self.created[p]
        if self.open[p] == 0 and left > 0:
            self._start(p, left, "fill")

    # ------------------------------------------------------------------ decoding
    def _step(self) -> None:
        rows = list(self.active)
        out = self.engine.step([self.live[i].seq for i in rows], self.sampling)
        self.stats["steps"] += 1
        tokens, ran = out.tokens.tolist(), out.ran.tolist()
        logprobs, entropies = torch.stack([out.logprobs, out.entropy]).float().cpu().tolist()
        for r, i in enumerate(rows):
            if ran[r]:
                self._on_token(i, tokens[r], logprobs[r], entropies[r])

    def _on_token(self, i: int, token: int, logprob: float, entropy: float) -> None:
        t, live, k = self.trajs[i], self.live[i], self.config.entropy_tokens
        t.response_ids.append(token)
        t.loss_mask.append(1)
        t.logprobs.append(logprob)
        t.entropies.append(entropy)
        self.stats["model_tokens"] += 1
        event = live.protocol.feed(token)
        if live.h_init is None:
            live.first.append(entropy)
            if len(live.first) >= k or event is not None:
                live.h_init = sum(live.first) / len(live.first)
        if live.probe is not None:
            live.probe.entropies.append(entropy)
            if len(live.probe.entropies) >= k or event is not None:
                self._decide(i)
        if event is None:
            if len(t.response_ids) >= self.config.max_response_tokens:
                self._finish(i, "length")
        elif event.kind == "call":
            self._call(i, event.call)
        else:
            self._finish(i, event.kind)

    def _call(self, i: int, call) -> None:
        self.stats["tool_calls"] += 1
        if len(self.trajs[i].response_ids) >= self.config.max_response_tokens:
            self._finish(i, "length")  # no room for the result: do not run the call
            return
        del self.active[i]
        if call.ok and self.executor is not None:
            future = self.executor.submit(call.name, call.body)
        else:  # nothing to run: the model reads back why
            future = Future()
            future.set_result(call.error or f"Tool '{call.name}' is not available in this run.")
        self.waiting[i] = future

    def _collect(self, block: bool) -> None:
        if block:
            wait(list(self.waiting.values()), return_when=FIRST_COMPLETED)
        for i in sorted(i for i, f in self.waiting.items() if f.done()):
            result = self.waiting.pop(i).result()
            self._append_result(i, result if isinstance(result, str) else result.text)

    def _append_result(self, i: int, text: str) -> None:
        t, live = self.trajs[i], self.live[i]
        ids = live.protocol.result_ids(text)
        room = self.config.max_response_tokens - len(t.response_ids)
        ids = ids[:room]
        t.response_ids.extend(ids)
        t.loss_mask.extend([0] * len(ids))
        t.logprobs.extend([0.0] * len(ids))
        t.entropies.extend([0.0] * len(ids))
        self.stats["tool_tokens"] += len(ids)
        if len(ids) == room:
            self._finish(i, "length")
            return
        self.engine.extend(live.seq, ids)
        if self.created[t.prompt_index] < self.config.rollouts:
            live.probe = _Probe(len(t.response_ids), live.protocol.fork())
        self.active[i] = None

    # ------------------------------------------------------------------ branching
    def _decide(self, i: int) -> None:
        t, live, cfg = self.trajs[i], self.live[i], self.config
        probe, live.probe = live.probe, None
        d_h = (sum(probe.entropies) / len(probe.entropies) - live.h_init) / self.log_v
        u = _uniform(live.key, probe.at)
        if min(max(u - cfg.entropy_weight * d_h, 0.0), 1.0) > cfg.threshold:
            return
        p = t.prompt_index
        n = min(cfg.branches - 1, cfg.rollouts - self.created[p])
        if n <= 0:
            return
        children = self.engine.fork(live.seq, n, at=len(t.prompt_ids) + probe.at)
        if probe.at > live.node_start:  # the open node up to the branch point becomes shared
            self.node_tokens[t.path[-1]] = probe.at - live.node_start
            t.path.append(self._new_node())
            live.node_start = probe.at
        shared = t.path[:-1]
        self.stats["branch_points"] += 1
        self.stats["branch_copies"] += n
        for seq in children:
            c = len(self.trajs)
            self.trajs.append(Trajectory(
                p, t.prompt_ids, "branch", parent=i, response_ids=t.response_ids[:probe.at],
                loss_mask=t.loss_mask[:probe.at], logprobs=t.logprobs[:probe.at],
                entropies=t.entropies[:probe.at], path=shared + [self._new_node()]))
            live.copies += 1
            self.names.append(self.names[i] + (live.copies,))
            # keys take hash indices from 2^40 up, branch draws (_uniform) positions below that
            self.live[c] = _Live(seq, child_seed(live.key, (1 << 40) + live.copies),
                                 probe.protocol.fork(), probe.at, h_init=live.h_init)
            self.active[c] = None
        self.created[p] += n
        self.open[p] += n


def arpo_rollout(engine: RolloutEngine, protocol: Protocol, prompts: Sequence[Sequence[int]],
                 config: Optional[ARPOConfig] = None, sampling: Optional[SamplingParams] = None,
                 executor=None, seed: int = 0) -> Rollout:
    """Roll out ``config.rollouts`` trajectories per prompt as ARPO trees (module docstring).

    Args:
        engine: an ``arpo_fast.engine.Engine``, or anything else that is a :class:`RolloutEngine`.
        protocol: the tool-call protocol for the engine's tokenizer.
        prompts: token ids per prompt (chat template already applied).
        sampling: temperature/top-k/top-p for every step (``max_new_tokens`` is not used: see
            ``config.max_response_tokens``).
        executor: a ``ToolExecutor``; without one every call reads back that tools are unavailable.
        seed: the rollout's seed; trajectories are a function of it and the model.

    Returns a :class:`Rollout`; trajectories come by prompt, then depth first (a trajectory, then
    its branches), an order that does not depend on when tools finished. The engine holds none of
    them afterwards, also when this raises.
    """
    run = _TreeRollout(engine, protocol, executor, config or ARPOConfig(),
                       sampling or SamplingParams(), seed)
    try:
        return run.run(prompts)
    finally:
        run.release()
