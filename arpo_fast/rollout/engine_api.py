"""What the tree rollout needs from an engine: the few calls of ``arpo_fast.engine.Engine`` it
drives, as a ``typing.Protocol``, so that a scripted engine can stand in for it in tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Protocol

from arpo_fast.engine.params import SamplingParams
from arpo_fast.engine.runner import StepOutput


class RolloutEngine(Protocol):
    """Sequences are integer handles; sampling of a sequence depends only on its seed and position."""

    @property
    def vocab_size(self) -> int:
        """V, the size of the distributions that ``step`` samples from."""
        ...

    def add(self, prompt_ids: Sequence[int], seed: int = 0) -> int:
        """Start a sequence holding the prompt; returns its handle."""
        ...

    def step(
        self,
        seqs: Sequence[int],
        params: Optional[SamplingParams] = None,
        top_entropy: Optional[Sequence[bool]] = None,
    ) -> StepOutput:
        """Run every pending token of ``seqs`` and sample one token each. The tree reads the
        output's ``tokens``, ``logprobs``, ``entropy`` and ``ran`` (False: deferred to a later
        step); ``top_entropy`` (per sequence, whether to measure it) asks for ``top_entropy``, the
        entropy over the 10 most likely tokens (``arpo_semantics="reference"``)."""
        ...

    def extend(self, seq: int, token_ids: Sequence[int]) -> None:
        """Append tokens the model did not write (a tool result)."""
        ...

    def fork(self, seq: int, n: int, at: Optional[int] = None) -> list[int]:
        """``n`` children sharing the first ``at`` tokens (and their KV) of ``seq``."""
        ...

    def free(self, seq: int) -> None:
        """Release a sequence."""
        ...
