"""The tree rollout's settings (``ARPOConfig``), apart from the rollout so that the trainer's config
can hold them without importing the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from arpo_fast.settings import require_counts, setting


@dataclass(frozen=True)
class ARPOConfig:
    """Tree-rollout settings (defaults: the reference's reasoning runs)."""

    rollouts: int = setting(
        16, "M: trajectories per prompt, branches and fresh fills included (the GRPO group size)."
    )
    initial: int = setting(8, "N: trajectories started per prompt before any branching.")
    branches: int = setting(2, "Z: paths after a branch point (the trajectory and Z - 1 copies).")
    entropy_tokens: int = setting(
        20, "k: tokens after a tool result (and at the start) whose entropies are compared."
    )
    threshold: float = setting(0.5, "tau: the branch probability when the entropy did not change.")
    entropy_weight: float = setting(
        0.2, "beta: how much a normalised entropy rise raises the branch probability."
    )
    entropy_reduce: str = setting(
        "sum",
        "'sum' of the k tokens' entropies (the reference's scale) or "
        "their 'mean' (k times weaker: the branch probability stays near tau).",
    )
    arpo_semantics: str = setting(
        "ours",
        "'ours' (decide k tokens after each tool result, full-"
        "distribution entropy) or 'reference' (decide at each call from the "
        "segment before it, entropy over the top 10 tokens; see docs/training.md).",
    )
    branch_budget: Optional[str] = setting(
        None,
        "How a prompt's M - N branch slots are shared: 'split' among the initial trajectories in "
        "advance (a copy shares its source's), or 'pooled' (the reference's: one pool that copies "
        "and fills draw on too, granted in (call number, creation order) order; "
        "--arpo-semantics reference only). Auto: split, or pooled with --arpo-semantics "
        "reference. Both give the same tree whatever the tool latency (see docs/training.md).",
    )
    max_response_tokens: Optional[int] = setting(
        4096,
        "Tokens after the prompt, tool results included; a longer trajectory ends as ``length`` "
        "(auto: the reference's 4096 tokens, or the demo's 64 with --model demo).",
    )
    """None (``auto``) only inside the trainer's config, which resolves it per job."""

    def __post_init__(self):
        if not 1 <= self.initial <= self.rollouts:
            raise ValueError(
                f"need 1 <= initial <= rollouts, got initial={self.initial}, rollouts={self.rollouts}"
            )
        if self.branches < 2:
            raise ValueError(f"branches must be >= 2 (a branch point makes Z paths), got {self.branches}")
        require_counts(self, "entropy_tokens")
        if self.max_response_tokens is not None:
            require_counts(self, "max_response_tokens")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not math.isfinite(self.entropy_weight):
            raise ValueError(f"entropy_weight must be finite, got {self.entropy_weight}")
        if self.entropy_reduce not in ("sum", "mean"):
            raise ValueError(f"entropy_reduce must be 'sum' or 'mean', got {self.entropy_reduce!r}")
        if self.arpo_semantics not in ("ours", "reference"):
            raise ValueError(f"arpo_semantics must be 'ours' or 'reference', got {self.arpo_semantics!r}")
        if self.branch_budget not in (None, "split", "pooled"):
            raise ValueError(f"branch_budget must be 'split' or 'pooled', got {self.branch_budget!r}")
        if self.branch_budget == "pooled" and self.arpo_semantics != "reference":
            raise ValueError(
                "branch_budget pooled needs arpo_semantics reference (which decides at the call, "
                "before the result: ours decides while decoding, where waiting for slots would stall it)"
            )

    @property
    def pooled(self) -> bool:
        """Whether the branch budget is one pool per prompt (``branch_budget``, auto resolved)."""
        if self.branch_budget is None:
            return self.arpo_semantics == "reference"
        return self.branch_budget == "pooled"
