"""ARPO tree rollout: entropy-guided branching after tool calls, on the paged-KV engine.

Per prompt, ``initial`` (N) trajectories start, out of a budget of ``rollouts`` (M). Each decodes
until it closes a tool tag, ends (EOS; or closes ``</answer>`` when the protocol stops there) or
reaches ``max_response_tokens``. A tool call goes to the executor and its trajectory waits while
every other trajectory keeps decoding: there are no global rounds. The result comes back as tokens
with loss mask 0. A call past the per-trajectory limit is not run: EOS is appended (loss mask 1, as
in the reference) and the trajectory ends as ``limit``.

Branching (``arpo_semantics="ours"``, the default): H_t is the entropy of the sampled distributions
over the ``entropy_tokens`` (k) tokens after a tool result, summed over those tokens (the
reference's scale; ``entropy_reduce="mean"`` averages them, k times weaker); H_init is the same over
the trajectory's first k tokens (a branch keeps its source's). dH = (H_t - H_init) / ln V. With
u ~ U(0, 1) the trajectory branches when clip(u - entropy_weight * dH, 0, 1) <= threshold, that is
with probability clip(threshold + entropy_weight * dH, 0, 1): ``branches - 1`` copies fork right
after the tool result, sharing its KV blocks (no copy, no recompute), and sample their own
continuations.

``arpo_semantics="reference"`` follows the reference implementation's rule as closely as an
asynchronous rollout can: a token's entropy is taken over its 10 most likely tokens only, H of a
segment covers its first k tokens, and the decision is taken at each call from the segment that
ends there (H_init is a trajectory's first segment, so its first call is a coin flip at
``threshold``); the copies still fork after the call's result.

Budget (``branch_budget``): ``split`` divides the M - N branch slots of a prompt among its initial
trajectories in advance (the first ones get one more when they do not divide evenly), and a
trajectory that branches splits what it has left among the paths it becomes: no trajectory waits
for, or races, another for a slot; unused slots start fresh trajectories, all at once, when the
prompt's have finished. ``pooled`` (the default of ``arpo_semantics="reference"``) is the
reference's: one pool per prompt that copies and fills (one at a time) draw on too, granted in
(call number, creation order) order (``budget.py``). Either way a tree is a function of (seed,
prompt, tool outputs), never of which tool answered first. The reference's rule draws once per
copy, ours once for all Z - 1.

Every draw is a function of (rollout seed, prompt, trajectory, position): the same seed gives the
same trajectories whatever order the tools finish in, up to the model's own float arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Optional

import torch

from arpo_fast.engine.params import SamplingParams
from arpo_fast.rollout.budget import BranchPool
from arpo_fast.rollout.config import ARPOConfig
from arpo_fast.rollout.engine_api import RolloutEngine
from arpo_fast.rollout.live import LiveTrajectory as _Live
from arpo_fast.rollout.live import Window as _Window
from arpo_fast.rollout.live import split_slots as _split
from arpo_fast.rollout.live import uniform as _uniform
from arpo_fast.rollout.protocol import Protocol
from arpo_fast.rollout.recorder import TreeRecorder
from arpo_fast.rollout.rollout_tree import RolloutTree
from arpo_fast.seeds import child_seed


class _TreeRollout:
    def __init__(
        self,
        engine: RolloutEngine,
        protocol: Protocol,
        executor,
        config: ARPOConfig,
        sampling: SamplingParams,
        seed: int,
        prompt_seeds: Optional[Sequence[int]],
    ):
        self.engine, self.protocol, self.executor = engine, protocol, executor
        self.config, self.sampling, self.seed = config, sampling, seed
        self.given_seeds = prompt_seeds
        if config.max_response_tokens is None:
            raise ValueError("arpo_rollout: config.max_response_tokens is auto; give a token count")
        self.limit: int = config.max_response_tokens
        # --arpo-semantics reference: the reference implementation's branching rule (top-10 entropy,
        # the decision at the call from the segment before it, one draw per copy)
        self.reference_rule = config.arpo_semantics == "reference"
        self.pooled = config.pooled
        self.pool = BranchPool(0)
        self.log_v = math.log(max(int(engine.vocab_size), 2))
        self.record = TreeRecorder([])
        self.names: list[tuple[int, ...]] = []  # (start index, copy index, copy index, ...)
        self.live: dict[int, _Live] = {}
        self.active: dict[int, None] = {}  # ordered set of trajectories ready to decode
        self.waiting: dict[int, Future] = {}  # identical calls may share one future
        self.created: list[int] = []
        self.open: list[int] = []
        self.granted: list[int] = []
        self.stats = dict.fromkeys(
            ("branch_points", "branch_copies", "fills", "tool_calls", "model_tokens", "tool_tokens", "steps"),
            0,
        )

    # ------------------------------------------------------------------ lifecycle
    def run(self, prompts: Sequence[Sequence[int]]) -> RolloutTree:
        self.record = TreeRecorder(prompts)
        self.prompts = self.record.tree.prompts
        seeds = self.given_seeds
        self.prompt_seeds = (
            [child_seed(self.seed, p) for p in range(len(prompts))] if seeds is None else seeds
        )
        if len(self.prompt_seeds) != len(prompts):
            raise ValueError(
                f"arpo_rollout: {len(self.prompt_seeds)} prompt seeds for {len(prompts)} prompts"
            )
        self.created, self.open = [0] * len(prompts), [0] * len(prompts)
        self.granted = [0] * len(prompts)  # pooled: slots granted to copies not forked yet
        cfg = self.config
        shares = _split(cfg.rollouts - cfg.initial, cfg.initial)
        if self.pooled:  # one pool per prompt: no shares
            self.pool, shares = BranchPool(len(prompts)), [0] * cfg.initial
        for p in range(len(prompts)):
            self._start(p, shares, "initial")
        while self.active or self.waiting:
            self._collect(block=not self.active)
            if self.active:
                self._step()
        # an order that does not depend on when tools finished: by prompt, then depth first (a
        # trajectory, then its branches)
        trajectories = self.record.tree.trajectories
        return self.record.finish([(t.prompt_index, n) for t, n in zip(trajectories, self.names)], self.stats)

    def release(self) -> None:
        """Free whatever is still held (after an error): the engine's pool is left as found."""
        for live in self.live.values():
            self.engine.free(live.seq)
        self.live.clear()
        for future in self.waiting.values():
            future.cancel()

    def _start(self, p: int, shares: list[int], kind: str) -> None:
        """Start one trajectory of prompt ``p`` per entry of ``shares`` (its branch slots)."""
        for share in shares:
            key = child_seed(self.prompt_seeds[p], self.created[p])
            self.names.append((self.created[p],))
            self.created[p] += 1
            self.open[p] += 1
            seq = self.engine.add(self.prompts[p], key)
            i = self.record.start(p, kind)
            live = _Live(seq, key, self.protocol.new_trajectory(), share, window=_Window(0))
            live.order = self.created[p] - 1
            self.live[i] = live
            self.active[i] = None
            if self.pooled:
                self.pool.join(p, i, (1, live.order))
        if kind == "fill":
            self.stats["fills"] += len(shares)

    def _finish(self, i: int, reason: str) -> None:
        live = self.live.pop(i)
        p = self._prompt(i)
        self.record.end(i, reason, live.protocol.calls)
        self.active.pop(i, None)
        self.engine.free(live.seq)
        self.open[p] -= 1
        left = self.config.rollouts - self.created[p]
        if self.open[p] == 0 and left > 0:  # pooled: one at a time, each free to branch
            self._start(p, [0] * (1 if self.pooled else left), "fill")
        if self.pooled:
            self.pool.leave(p, i)
            self._grant(p)

    # ------------------------------------------------------------------ decoding
    def _step(self) -> None:
        rows = list(self.active)
        if self.reference_rule:  # the top-10 entropy, only for rows measuring a segment's first k tokens
            wanted = [self.live[i].window is not None for i in rows]
            out = self.engine.step([self.live[i].seq for i in rows], self.sampling, top_entropy=wanted)
            measured = out.top_entropy
        else:
            out = self.engine.step([self.live[i].seq for i in rows], self.sampling)
            measured = out.entropy
        self.stats["steps"] += 1
        tokens, ran = out.tokens.tolist(), out.ran.tolist()
        assert measured is not None  # asked for: step returns the top-10 entropy
        logprobs, entropies, measured = (
            torch.stack([out.logprobs, out.entropy, measured]).float().cpu().tolist()
        )
        for r, i in enumerate(rows):
            if ran[r]:
                self._on_token(i, tokens[r], logprobs[r], entropies[r], measured[r])

    def _on_token(self, i: int, token: int, logprob: float, entropy: float, measured: float) -> None:
        live = self.live[i]
        self.record.append(i, [token], 1, logprob, entropy)
        self.stats["model_tokens"] += 1
        event = live.protocol.feed(token)
        window = live.window
        if window is not None:
            window.entropies.append(measured)
            if len(window.entropies) >= self.config.entropy_tokens or event is not None:
                self._close_window(i)
        if event is None:
            if self.record.lengths[i] >= self.limit:
                self._finish(i, "length")
        elif event.kind == "call":
            self._call(i, event.call)
        elif event.kind == "limit":
            self._limit(i)
        else:
            self._finish(i, event.kind)

    def _limit(self, i: int) -> None:
        """A call past the limit is not run; like the reference, end with EOS (model-written)."""
        eos = self.protocol.eos_token_id
        if eos is not None and self.record.lengths[i] < self.limit:
            self.record.append(i, [eos], 1, math.nan, math.nan)
        self._finish(i, "limit")

    def _call(self, i: int, call) -> None:
        if self.record.lengths[i] >= self.limit:
            self._finish(i, "length")  # no room for the result: do not run the call
            return
        self.stats["tool_calls"] += 1
        del self.active[i]
        if self.reference_rule:
            self._decide_at_call(i)
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
        live = self.live[i]
        ids = live.protocol.result_ids(text)
        room = self.limit - self.record.lengths[i]
        ids = ids[:room]
        self.record.append(i, ids, 0, 0.0, 0.0)
        self.stats["tool_tokens"] += len(ids)
        if len(ids) == room:
            self._finish(i, "length")
            return
        self.engine.extend(live.seq, ids)
        if self.reference_rule or live.share > 0:  # the state the copies of a branch here start from
            live.fork_protocol = live.protocol.fork()
        if self.reference_rule:  # measure the next segment; fork the copies decided at the call
            live.window = _Window(self.record.lengths[i])
            live.stalled = self.pooled and self.pool.waiting(self._prompt(i), i)
            if not live.stalled:  # else resumed when its request is granted
                self._resume(i)
            return
        if live.share > 0:  # measure the k tokens after the result, then decide
            live.window = _Window(self.record.lengths[i])
        self.active[i] = None

    def _resume(self, i: int) -> None:
        """Fork the copies decided at the call whose result just came in, and decode on."""
        if self.live[i].pending:
            self._branch(i, self.live[i].pending, self.record.lengths[i])
        self.active[i] = None

    def _prompt(self, i: int) -> int:
        return self.record.tree.trajectories[i].prompt_index

    # ------------------------------------------------------------------ branching
    def _reduce(self, entropies: list[float]) -> float:
        total = sum(entropies)
        return total / len(entropies) if self.config.entropy_reduce == "mean" else total

    def _close_window(self, i: int) -> None:
        live = self.live[i]
        window, live.window = live.window, None
        assert window is not None  # closed once, when it is full
        value = self._reduce(window.entropies)
        if self.reference_rule:
            live.segment_h = value  # used at the call that ends this segment
        elif live.h_init is None:
            live.h_init = value
        else:
            self._decide(i, value, window.at)

    def _wants_branch(self, live: _Live, h_t: float, at: int, slots: int) -> int:
        """How many copies the branch rule makes at response index ``at`` (0: none) with ``slots``
        left. Ours: one draw for all Z - 1 copies (the paper's rule). The reference's: one draw
        per copy, as many draws as there are copies it may still make, min(Z - 1, slots)."""
        cfg = self.config
        assert live.h_init is not None  # set by the trajectory's first window, before any call
        d_h = (h_t - live.h_init) / self.log_v
        draws = min(cfg.branches - 1, slots) if self.reference_rule else 1
        wins = 0
        for j in range(draws):  # draw 0 is the one of ours: Z = 2 draws alike under both rules
            u = _uniform(live.key, at) if j == 0 else _uniform(child_seed(live.key, at), j)
            wins += min(max(u - cfg.entropy_weight * d_h, 0.0), 1.0) <= cfg.threshold
        return min(cfg.branches - 1, slots) if wins and not self.reference_rule else wins

    def _decide(self, i: int, h_t: float, at: int) -> None:
        """The default rule: decide from the k tokens after the result that ends at ``at``."""
        n = self._wants_branch(self.live[i], h_t, at, self.live[i].share)
        if n > 0:
            self._branch(i, n, at)

    def _decide_at_call(self, i: int) -> None:
        """The reference's rule: decide at the call, from the segment that ends with it."""
        live = self.live[i]
        if live.window is not None:  # a segment shorter than k tokens ended at this call
            self._close_window(i)
        h_t, live.segment_h = live.segment_h, None
        if h_t is not None and live.h_init is None:  # the first segment is the baseline: its
            live.h_init = h_t  # call is a coin flip
        at, p = self.record.lengths[i], self._prompt(i)
        if not self.pooled:
            if h_t is not None and live.share > 0:
                live.pending = self._wants_branch(live, h_t, at, live.share)
            return
        # slots only ever shrink (a grant whose copies found no room is not granted again: fills
        # take it), so a request that wins nothing now would win nothing when granted
        if h_t is None or self._wants_branch(live, h_t, at, self._slots(p)) == 0:
            self.pool.settle(p, i, live.protocol.calls)
            return
        live.request = (h_t, at)
        self.pool.ask(p, i, live.protocol.calls)
        self._grant(p)

    def _slots(self, p: int) -> int:
        """Pooled: the slots of prompt ``p`` neither used nor granted."""
        return self.config.rollouts - self.created[p] - self.granted[p]

    def _grant(self, p: int) -> None:
        """Grant prompt ``p``'s requests that are due (``budget.BranchPool``), in key order."""
        while (i := self.pool.next_grant(p)) is not None:
            live = self.live[i]
            assert live.request is not None  # the pool grants requests only
            (h_t, at), live.request = live.request, None
            live.pending = self._wants_branch(live, h_t, at, self._slots(p))
            self.granted[p] += live.pending
            self.pool.settle(p, i, live.protocol.calls)
            if live.stalled:
                live.stalled = False
                self._resume(i)

    def _branch(self, i: int, n: int, at: int) -> None:
        """Fork ``n`` copies of trajectory ``i`` at response index ``at`` (right after a tool
        result); the slots it has left are split between it and its copies."""
        live = self.live[i]
        live.pending = 0
        p = self._prompt(i)
        if self.pooled:
            self.granted[p] -= n
        children = self.engine.fork(live.seq, n, at=len(self.prompts[p]) + at)
        copies = self.record.branch(i, at, n)
        shares = [0] * (n + 1) if self.pooled else _split(live.share - n, n + 1)
        live.share = shares[0]
        self.stats["branch_points"] += 1
        self.stats["branch_copies"] += n
        for c, seq, share in zip(copies, children, shares[1:]):
            live.copies += 1
            self.names.append(self.names[i] + (live.copies,))
            # keys take hash indices from 2^40 up, branch draws (_uniform) positions below that
            key = child_seed(live.key, (1 << 40) + live.copies)
            assert live.fork_protocol is not None  # kept at the call that decided the branch
            if self.reference_rule:  # a copy's baseline is its own first segment after the fork
                copy = _Live(seq, key, live.fork_protocol.fork(), share, window=_Window(at))
            else:  # a copy keeps its source's baseline
                copy = _Live(seq, key, live.fork_protocol.fork(), share, h_init=live.h_init)
            copy.order = self.created[p]
            self.created[p] += 1
            self.live[c] = copy
            self.active[c] = None
            if self.pooled:  # its next decision is at its next call
                self.pool.join(p, c, (copy.protocol.calls + 1, copy.order))
        self.open[p] += n


def arpo_rollout(
    engine: RolloutEngine,
    protocol: Protocol,
    prompts: Sequence[Sequence[int]],
    config: Optional[ARPOConfig] = None,
    sampling: Optional[SamplingParams] = None,
    executor=None,
    seed: int = 0,
    prompt_seeds: Optional[Sequence[int]] = None,
) -> RolloutTree:
    """Roll out ``config.rollouts`` trajectories per prompt as ARPO trees (module docstring).

    Args:
        engine: an ``arpo_fast.engine.Engine``, or anything else that is a :class:`RolloutEngine`.
        protocol: the tool-call protocol for the engine's tokenizer.
        prompts: token ids per prompt (chat template already applied).
        sampling: temperature/top-k/top-p for every step (``max_new_tokens`` is not used: see
            ``config.max_response_tokens``).
        executor: a ``ToolExecutor``; without one every call reads back that tools are unavailable.
        seed: the rollout's seed; trajectories are a function of it and the model.
        prompt_seeds: per prompt, the seed its tree draws from (default: hashed from ``seed`` and the
            prompt's index), so that a prompt's tree can be the same wherever it is rolled out.

    Returns a :class:`RolloutTree`; trajectories come by prompt, then depth first (a trajectory, then
    its branches), an order that does not depend on when tools finished. The engine holds none of
    them afterwards, also when this raises.
    """
    run = _TreeRollout(
        engine, protocol, executor, config or ARPOConfig(), sampling or SamplingParams(), seed, prompt_seeds
    )
    try:
        return run.run(prompts)
    finally:
        run.release()
