"""The engine's scheduling policy: which sequences of a step run, and the KV slots they get.

A step runs every pending token of its sequences. When the KV pool cannot hold them, the policy is
``EngineConfig.on_pool_exhausted``: ``"raise"`` leaves everything as it was (``PoolExhaustedError``);
``"preempt"`` frees the KV of the youngest sequences (by arrival), others first, then members of the
step (which are deferred to a later step), never the last one left. A preempted sequence recomputes
its KV, prompt and generated tokens alike, when it next runs; its sampled tokens are the same as
without preemption, since sampling depends only on (seed, position) and the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from arpo_fast.engine.kv_cache import PagedKVCache
from arpo_fast.engine.sequence import SeqState
from arpo_fast.errors import PoolExhaustedError

T = TypeVar("T")


def _kv(state: SeqState) -> int:
    """The KV sequence of a state that holds one (reserved for its step, or a preemption victim)."""
    assert state.kv is not None, "only sequences holding KV are stepped or preempted"
    return state.kv


class Scheduler:
    """Reserves KV slots for a step's sequences (``seqs``: every live sequence, by id, shared with
    the engine), preempting under the ``"preempt"`` policy, and commits or undoes the step."""

    def __init__(self, cache: PagedKVCache, seqs: dict[int, SeqState], stats: dict[str, int]):
        self.cache, self.seqs, self.stats = cache, seqs, stats

    def reserve(self, states: list[SeqState], preempt: bool):
        """Reserve KV slots for every pending token of ``states``; returns (running states, step
        tensors). Under ``preempt`` the youngest sequences are evicted until the step fits: others
        first, then members of this step (which are deferred), never the last one left."""
        running = list(states)
        while True:
            for s in running:
                if s.kv is None:
                    s.kv = self.cache.new_sequence()
            try:
                meta = self.cache.prepare_step([_kv(s) for s in running], [s.pending for s in running])
                return running, meta
            except PoolExhaustedError:
                if not preempt:
                    raise
                victim = self._victim(running)
                if victim is None:
                    raise
                running = [s for s in running if s is not victim]
                self._preempt(victim)

    def _victim(self, running: list[SeqState]) -> SeqState | None:
        ids = {id(s) for s in running}
        others = [s for s in self.seqs.values() if id(s) not in ids and s.kv is not None and s.computed > 0]
        if others:
            return max(others, key=lambda s: s.order)
        if len(running) > 1:
            return max(running, key=lambda s: s.order)
        return None

    def _preempt(self, state: SeqState) -> None:
        self.cache.free(_kv(state))
        state.kv, state.computed = None, 0
        self.stats["preemptions"] += 1

    def execute(self, running: list[SeqState], compute: Callable[[], T]) -> T:
        """Run ``compute`` (the step's forward) for sequences whose slots are reserved; on failure
        give the slots back, so the step never happened. Then their pending tokens count as
        computed."""
        before = [(s, s.computed) for s in running]
        try:
            result = compute()
        except BaseException:
            for s, computed in before:
                self.cache.truncate(_kv(s), computed)
            raise
        for s in running:
            self.stats["prefill_tokens" if s.pending > 1 else "decode_tokens"] += s.pending
            s.computed = len(s.tokens)
        self.stats["steps"] += 1
        return result
