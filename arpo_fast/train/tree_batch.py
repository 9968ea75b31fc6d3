"""A tree-packed micro-batch (:class:`TreeBatch`, laid out by ``packing.py``) and how it runs: the
model's own forward over one packed row, its attention masked to each token's path
(``attention.py``), and the clipped loss once per predicted token, summed over its copies
(``algo.shared_policy_loss``). A split tree's prompt runs apart, once (:class:`PromptContext`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch

from arpo_fast.algo import CopyAdvantages, shared_policy_loss
from arpo_fast.kernels import logprob_entropy
from arpo_fast.train.attention import path_masks, tree_mask
from arpo_fast.train.hf_adapter import hidden_states, lm_head_weight
from arpo_fast.train.update_config import UpdateConfig


class PromptContext:
    """The prompt of a split tree but its last token (positions 0..P-2), shared by the tree's groups:
    the update runs it once and hands its keys and values to every micro-batch that holds a group
    (``groups`` of them). Identified by the object itself."""

    def __init__(self, input_ids: torch.Tensor, groups: int):
        self.input_ids = input_ids  # int64 [P - 1], on the host
        self.groups = groups

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def run(self, policy, temperature: float, attention: str, context=None, vocab_limit=None) -> torch.Tensor:
        """The decoder's output on the context alone; ``context``: its ``attention.ContextRun``,
        which keeps each layer's keys and values."""
        ids = self.input_ids.to(policy.device)[None]
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        return hidden_states(policy, input_ids=ids, position_ids=positions, tree_context=context)


@dataclass
class TreeBatch:
    """One packed row of tokens (trees or pieces of trees back to back) and its predicted tokens.

    ``T`` tokens go through the model; ``n`` of them are predicted: the model-written response tokens
    this micro-batch owns, each once, standing for all of its copies."""

    input_ids: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T]: depth along the token's own path
    subtree_end: torch.Tensor  # int64 [T]: key j is visible to query i iff j <= i < subtree_end[j]
    hidden_index: torch.Tensor  # int64 [n]: the row position whose hidden state predicts the token
    targets: torch.Tensor  # int64 [n]
    copies: CopyAdvantages  # fp32 [n] each: the advantages of the token's copies
    rollout_logprobs: torch.Tensor  # fp32 [n]: the sampler's (NaN where it drew none)
    origin: torch.Tensor  # int64 [n, 2]: (trajectory, response offset) of the token's first copy
    path_keys: torch.Tensor  # int64 [sum of K]: per path, the row positions of its tokens in order
    path_sizes: list[tuple[int, int]]  # per path (K, q): its tokens, and how many at its end are its
    # own queries (each row position is one path's query once)
    piece_starts: list[int]  # where each piece starts in the row, then T (cu_seqlens of chains)
    model_tokens: int  # model-written tokens counted per copy (copies.count's sum)
    dummy: bool = False  # a stand-in that counts for nothing (distributed.py: equal counts)
    # Prompt contexts the row attends to, their keys in this order in front of the row's own (C in
    # all); path_keys count those C keys first. Context key c is seen by the row's queries
    # context_lo[c] <= i < context_hi[c] (the group it is the prompt of).
    contexts: list[PromptContext] = field(default_factory=list)
    context_lo: Optional[torch.Tensor] = None  # int64 [C]
    context_hi: Optional[torch.Tensor] = None  # int64 [C]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def context_tokens(self) -> int:
        return sum(c.tokens for c in self.contexts)

    @property
    def copy_counts(self) -> torch.Tensor:
        return self.copies.count

    def run(self, policy, temperature: float, attention: str, context=None, vocab_limit=None):
        logprobs, entropy = tree_logprobs(policy, self, temperature, attention, context, vocab_limit)
        return logprobs.clone(), entropy.clone()  # not views: FSDP2 hooks the outputs for backward

    def policy_loss(
        self, logprobs, old_logprobs, entropy, weights: Optional[torch.Tensor], cfg: UpdateConfig
    ):
        copies = self.copies if weights is None else self.copies.scaled(weights)
        return shared_policy_loss(
            logprobs,
            old_logprobs,
            copies,
            cfg.clip_low,
            cfg.clip_high,
            cfg.dual_clip or None,
            entropy=entropy,
            entropy_coef=cfg.entropy_coef,
        )

    def token_mean(self, values: torch.Tensor) -> torch.Tensor:
        count = self.copies.count
        return torch.where(count > 0, values * count, 0.0).sum() / count.sum().clamp_min(1)

    def to(self, device) -> TreeBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), (torch.Tensor, CopyAdvantages))
        }
        return replace(self, **moved)

    @classmethod
    def stand_in(cls, pad_id: int, device) -> TreeBatch:
        """One pad token that counts for nothing."""
        one = torch.tensor([0], dtype=torch.int64, device=device)
        pad = torch.full((1,), pad_id, dtype=torch.int64, device=device)
        zero = torch.zeros(1, device=device)
        return cls(
            input_ids=pad,
            position_ids=one,
            subtree_end=one + 1,
            hidden_index=one,
            targets=pad,
            copies=CopyAdvantages(zero, zero, zero, zero, zero),
            rollout_logprobs=torch.full((1,), math.nan, device=device),
            origin=torch.zeros(1, 2, dtype=torch.int64, device=device),
            path_keys=one,
            path_sizes=[(1, 1)],
            piece_starts=[0, 1],
            model_tokens=0,
            dummy=True,
        )


def tree_logprobs(
    model, batch: TreeBatch, temperature: float, implementation: str, context=None, vocab_limit=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy (fp32 [n]) of each predicted token of a packed row, the model's
    attention running as ``implementation`` (set with ``attention.attention_implementation``);
    ``context``: the keys and values of the row's prompt contexts (``contexts.ContextCache``);
    ``vocab_limit`` as in ``padded.token_logprobs``."""
    if batch.contexts and context is None:
        raise ValueError("a packed row with prompt contexts needs their keys and values")
    if implementation == "flash_attention_2":  # independent sequences: varlen, no mask
        cu = torch.tensor(batch.piece_starts, dtype=torch.int32, device=batch.input_ids.device)
        longest = max(b - a for a, b in zip(batch.piece_starts, batch.piece_starts[1:]))
        attend = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    elif implementation == "flex_attention":
        attend = dict(
            attention_mask=tree_mask(batch.subtree_end, implementation, batch.context_lo, batch.context_hi)
        )
    else:
        attend = dict(tree_paths=path_masks(batch.path_keys, batch.path_sizes, batch.context_tokens))
    if batch.contexts:
        attend["tree_context"] = context
    hidden = hidden_states(
        model, input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], **attend
    )
    return logprob_entropy(
        hidden[0].index_select(0, batch.hidden_index),
        lm_head_weight(model),
        batch.targets,
        temperature,
        vocab_limit=vocab_limit,
    )
