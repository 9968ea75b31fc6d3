"""The per-trajectory layout of the update (``--packed-update false``): every trajectory from its
first token, right-padded, the reference's layout; micro-batches group trajectories of similar
length within ``micro_batch_tokens`` padded tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from arpo_fast.algo import aggregate, policy_loss
from arpo_fast.kernels import logprob_entropy
from arpo_fast.train.hf_adapter import hidden_states, lm_head_weight
from arpo_fast.train.update_config import UpdateConfig


@dataclass
class PaddedBatch:
    """A micro-batch of whole trajectories: right-padded [b, L] inputs, and flat per-response-token
    rows (``n`` of them: every response token of its trajectories, in order)."""

    input_ids: torch.Tensor  # int64 [b, L]
    attention_mask: torch.Tensor  # int64 [b, L]
    positions: torch.Tensor  # int64 [n]: flat index into [b * L] of each hidden state used
    targets: torch.Tensor  # int64 [n]: the response token that hidden state predicts
    loss_mask: torch.Tensor  # bool [n]
    rollout_logprobs: torch.Tensor  # fp32 [n]: the sampler's (NaN for a token it did not sample)
    advantages: torch.Tensor  # fp32 [n]
    model_tokens: int  # loss_mask's count, known on the host
    dummy: bool = False  # a stand-in that counts for nothing

    @property
    def contexts(self) -> list:
        return []  # whole trajectories: nothing is run apart

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def copy_counts(self) -> torch.Tensor:
        return self.loss_mask.float()

    def run(self, policy, temperature: float, attention: str, context=None, vocab_limit=None):
        logprobs, entropy = token_logprobs(policy, self, temperature, vocab_limit)
        return logprobs.clone(), entropy.clone()  # not views: FSDP2 hooks the outputs for backward

    def policy_loss(
        self, logprobs, old_logprobs, entropy, weights: Optional[torch.Tensor], cfg: UpdateConfig
    ):
        adv = self.advantages.to(logprobs.device)
        if weights is not None:  # a weight w >= 0 on a token's clipped loss is a weight on its A
            adv = adv * weights
        return policy_loss(
            logprobs[None],
            old_logprobs[None],
            adv[None],
            self.loss_mask[None],
            cfg.clip_low,
            cfg.clip_high,
            cfg.dual_clip or None,
            entropy=entropy[None],
            entropy_coef=cfg.entropy_coef,
        )

    def token_mean(self, values: torch.Tensor) -> torch.Tensor:
        return aggregate(values, self.loss_mask)

    @classmethod
    def stand_in(cls, pad_id: int, device) -> PaddedBatch:
        """One pad token that counts for nothing."""
        pad = torch.full((1,), pad_id, dtype=torch.int64, device=device)
        return cls(
            input_ids=pad[None],
            attention_mask=torch.ones((1, 1), dtype=torch.int64, device=device),
            positions=torch.zeros(1, dtype=torch.int64, device=device),
            targets=pad,
            loss_mask=torch.zeros(1, dtype=torch.bool, device=device),
            rollout_logprobs=torch.full((1,), math.nan, device=device),
            advantages=torch.zeros(1, device=device),
            model_tokens=0,
            dummy=True,
        )


def micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices so that each group's padded size (count x longest) stays within
    ``max_tokens`` (a longer sequence goes alone); similar lengths go together."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current] if current else groups


def pack(
    trajectories, rows: list[int], pad_id: int, device, advantages: Optional[Sequence[torch.Tensor]] = None
) -> PaddedBatch:
    """The trajectories ``rows`` (``RolloutTree.trajectories``) as one padded micro-batch on
    ``device``; ``advantages``: per trajectory, fp32 [len(response)] (default zeros)."""
    seqs = [trajectories[i].prompt_ids + trajectories[i].response_ids for i in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    attn = torch.zeros((len(rows), width), dtype=torch.int64)
    positions: list[int] = []
    targets: list[int] = []
    mask: list[int] = []
    rollout: list[float] = []
    for r, (i, seq) in enumerate(zip(rows, seqs)):
        t = trajectories[i]
        ids[r, : len(seq)] = torch.tensor(seq)
        attn[r, : len(seq)] = 1
        start = r * width + len(t.prompt_ids) - 1  # the hidden state before each response token
        response = seq[len(t.prompt_ids) :]
        positions.extend(range(start, start + len(response)))
        targets.extend(response)
        mask.extend(t.loss_mask)
        rollout.extend(t.logprobs)
    adv = (
        torch.cat([advantages[i] for i in rows]).float()
        if advantages is not None
        else torch.zeros(len(targets))
    )
    return PaddedBatch(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        positions=torch.tensor(positions, dtype=torch.int64).to(device),
        targets=torch.tensor(targets, dtype=torch.int64).to(device),
        loss_mask=torch.tensor(mask, dtype=torch.bool).to(device),
        rollout_logprobs=torch.tensor(rollout, dtype=torch.float32).to(device),
        advantages=adv.to(device),
        model_tokens=sum(mask),
    )


def token_logprobs(
    model, batch: PaddedBatch, temperature: float, vocab_limit: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy (fp32 [n]) of each response token under the model at ``temperature``,
    over the ids below ``vocab_limit`` (None: every row of the LM head)."""
    hidden = hidden_states(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.positions)
    return logprob_entropy(hidden, lm_head_weight(model), batch.targets, temperature, vocab_limit=vocab_limit)
