"""The tree rollout's state of one live trajectory, and the draws and shares it is decided by."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from arpo_fast.rollout.protocol import TrajectoryProtocol
from arpo_fast.seeds import MAX_SEED, child_seed


@dataclass
class Window:
    """Entropies of up to k tokens from response index ``at`` on; ``value`` once it is closed."""

    at: int
    entropies: list[float] = field(default_factory=list)


@dataclass
class LiveTrajectory:
    seq: int
    key: int  # for this trajectory's branch draws
    protocol: TrajectoryProtocol
    share: int  # branch slots this trajectory may still use
    h_init: Optional[float] = None
    window: Optional[Window] = None  # the entropies being measured now
    fork_protocol: Optional[TrajectoryProtocol] = None  # the protocol state at the fork point
    segment_h: Optional[float] = None  # reference rule: H of the segment the next call ends
    pending: int = 0  # copies decided at a call, forked when its result is in
    copies: int = 0
    order: int = 0  # created as the prompt's order-th trajectory (the pooled budget's keys)
    request: Optional[tuple[float, int]] = None  # pooled: (H_t, at) of the decision awaiting slots
    stalled: bool = False  # pooled: its result is in, its request is not granted yet


def uniform(key: int, index: int) -> float:
    """A draw in [0, 1) that is a function of (``key``, ``index``) alone."""
    return child_seed(key, index) / (MAX_SEED + 1)


def split_slots(total: int, parts: int) -> list[int]:
    """``total`` slots over ``parts`` holders, the first ones getting one more when it does not divide."""
    return [total // parts + (j < total % parts) for j in range(parts)]
