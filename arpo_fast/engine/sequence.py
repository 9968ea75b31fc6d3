"""Per-sequence engine state, kept small: the token list, how much of it has KV, and the seed.

A sequence's tokens are ``tokens[:computed]`` (their K/V is in the cache, under forker sequence
``kv``) followed by pending tokens ``tokens[computed:]`` that the next step runs through the model:
the prompt after ``add``, a tool result after ``extend``, the last sampled token after ``step``.
A preempted sequence has ``kv = None`` and ``computed = 0``: its next step recomputes everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from arpo_fast.engine.model import Batch


@dataclass(eq=False)  # compared by identity
class SeqState:
    seed: int
    tokens: list[int]
    order: int
    """Arrival order; preemption evicts the largest (youngest) first."""
    kv: int | None = None
    computed: int = 0
    forks: int = field(default=0)
    """Children made so far, so every child of a parent gets a distinct seed."""

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed


def build_batch(states: list[SeqState], meta, device: torch.device, all_positions: bool) -> Batch:
    """The ragged step of ``states`` (each running all its pending tokens) as device tensors.

    ``meta`` is the cache's ``StepTensors`` for the same sequences and counts."""
    counts = np.fromiter((s.pending for s in states), dtype=np.int64, count=len(states))
    starts = np.fromiter((s.computed for s in states), dtype=np.int64, count=len(states))
    cu = np.zeros(len(states) + 1, dtype=np.int64)
    np.cumsum(counts, out=cu[1:])
    ids = np.fromiter((t for s in states for t in s.tokens[s.computed :]), dtype=np.int64, count=int(cu[-1]))
    positions = np.arange(cu[-1], dtype=np.int64) + np.repeat(starts - cu[:-1], counts)
    rows = np.arange(cu[-1], dtype=np.int64) if all_positions else cu[1:] - 1

    def dev(a: np.ndarray, dtype=None) -> torch.Tensor:
        t = torch.from_numpy(a if dtype is None else a.astype(dtype))
        return t.to(device, non_blocking=True)

    return Batch(
        dev(ids),
        dev(positions),
        meta.slot_mapping,
        meta.block_tables,
        meta.context_lens,
        dev(cu, np.int32),
        dev(rows),
        int(counts.max()),
    )
