"""Counter-based seeds shared by the engine and the rollout: a child seed is a hash of (parent,
index), so every draw is a function of where it happens, never of the order things happen in."""

from __future__ import annotations

MASK64 = (1 << 64) - 1
MAX_SEED = (1 << 63) - 1


def child_seed(seed: int, index: int) -> int:
    """A child's seed: a splitmix64 hash of (parent seed, child index), in [0, 2^63)."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return (x ^ (x >> 31)) & MAX_SEED
