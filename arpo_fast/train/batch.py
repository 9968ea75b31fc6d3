"""The one interface the update runs micro-batches through, in either layout.

A micro-batch is a :class:`Batch`: the tree-packed rows (``tree_batch.TreeBatch``, laid out by
``packing.py``) and the per-trajectory padded rows (``padded.PaddedBatch``) both implement it, so
the update (``update.py``) and the prompt contexts (``contexts.py``) never ask which one they hold.
:class:`LogprobModel` is the policy as the update calls it: one module call per micro-batch (or
prompt context), whatever it is.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from arpo_fast.train.update_config import UpdateConfig


class Batch(Protocol):
    """A micro-batch of the update: ``n`` predicted tokens, each standing for one or more
    model-written tokens (``copy_counts``)."""

    rollout_logprobs: torch.Tensor
    """fp32 [n]: the sampler's log-prob of each predicted token (NaN where it drew none)."""
    model_tokens: int
    """Model-written tokens it stands for, every copy of a shared token counted (on the host)."""
    dummy: bool
    """A stand-in that counts for nothing (a rank with fewer micro-batches runs these)."""

    @property
    def contexts(self) -> list:
        """The prompt contexts (``tree_batch.PromptContext``) its rows attend to, in order."""
        ...

    @property
    def tokens(self) -> int:
        """Tokens its forward runs through the model (its prompt contexts apart)."""
        ...

    @property
    def copy_counts(self) -> torch.Tensor:
        """fp32 [n]: per predicted token, the model-written tokens it stands for (0: none)."""
        ...

    def run(self, policy, temperature: float, attention: str, context=None, vocab_limit=None):
        """Log-prob and entropy (fp32 [n] each) of its predicted tokens under ``policy``, over the
        ids below ``vocab_limit`` (None: every row of the LM head)."""
        ...

    def policy_loss(
        self, logprobs, old_logprobs, entropy, weights: Optional[torch.Tensor], cfg: UpdateConfig
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped loss, token mean over its model-written tokens (``weights``: truncated
        importance weights per predicted token, or None)."""
        ...

    def token_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of per-predicted-token ``values`` over its model-written tokens, every copy counted."""
        ...


class LogprobModel(torch.nn.Module):
    """The policy as the update uses it: ``forward(batch, temperature, attention, context)`` runs
    ``batch.run`` on it, a :class:`Batch` (its predicted tokens' log-probs and entropies) or a
    ``PromptContext`` (the decoder's output; its keys and values go to ``context``). One module
    call, so that under FSDP2 the root's parameters (embedding, final norm, LM head) are gathered
    for exactly that computation.

    ``vocab_limit``: the tokenizer's size where the LM head has rows past it; the distributions
    then cover the ids below it only, as the rollout engine samples them (``update`` sets it)."""

    def __init__(self, policy: torch.nn.Module, vocab_limit: Optional[int] = None):
        super().__init__()
        self.policy = policy
        self.vocab_limit = vocab_limit

    def forward(self, batch, temperature: float, attention: str = "sdpa", context=None):
        return batch.run(self.policy, temperature, attention, context, self.vocab_limit)
