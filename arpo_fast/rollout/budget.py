"""The pooled branch budget (``branch_budget="pooled"``): one pool of M - N slots per prompt, which
copies and fresh fills use as well as the initial trajectories, granted in an order fixed by the
tree alone.

A decision at a trajectory's c-th call has the key (c, o), o being the order in which the
trajectory was created within its prompt. Requests are granted in key order, and a request is
granted only once no trajectory of the prompt could still make one with a lower key: a live
trajectory that has settled c calls can still ask at (c + 1, o) or later (its *bound*). A
trajectory created by a grant is created after all the others, so its order is higher, and it asks
at the next call at the earliest; creation order, and so every key, is the same whichever tool
answers first. This is the reference's rule (one pool, granted in index order round by round) with
call numbers for rounds, so that no trajectory's grant depends on tool latency. The price: a
trajectory whose tool answered before its request could be granted waits (it stalls).
"""

from __future__ import annotations

from typing import Optional

Key = tuple[int, int]


class BranchPool:
    """The bounds and open requests of each prompt's live trajectories (not the slots: the rollout
    counts those, M minus the trajectories it created)."""

    def __init__(self, prompts: int):
        self.bounds: list[dict[int, Key]] = [{} for _ in range(prompts)]
        self.requests: list[dict[int, Key]] = [{} for _ in range(prompts)]

    def join(self, p: int, i: int, key: Key) -> None:
        """Trajectory ``i`` of prompt ``p`` is live and may ask at ``key`` or later."""
        self.bounds[p][i] = key

    def leave(self, p: int, i: int) -> None:
        """Trajectory ``i`` ended: it asks for nothing more (an open request is dropped)."""
        self.bounds[p].pop(i, None)
        self.requests[p].pop(i, None)

    def settle(self, p: int, i: int, call: int) -> None:
        """Trajectory ``i``'s decision at its call ``call`` is taken: it may ask again at the next."""
        self.bounds[p][i] = (call + 1, self.bounds[p][i][1])

    def ask(self, p: int, i: int, call: int) -> None:
        """Trajectory ``i`` asks for slots at its call ``call``."""
        key = (call, self.bounds[p][i][1])
        self.bounds[p][i] = self.requests[p][i] = key

    def waiting(self, p: int, i: int) -> bool:
        return i in self.requests[p]

    def next_grant(self, p: int) -> Optional[int]:
        """The trajectory whose request is granted now, if any: the request with the lowest key,
        once no live trajectory of ``p`` could still ask at a lower one."""
        if not self.requests[p]:
            return None
        i = min(self.requests[p], key=self.requests[p].__getitem__)
        if min(self.bounds[p].values()) < self.requests[p][i]:
            return None
        del self.requests[p][i]
        return i
