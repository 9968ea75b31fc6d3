"""The update side of a training step: trajectories' log-probs under the policy, and clipped updates.

Trajectories are packed into micro-batches of at most ``micro_batch_tokens`` padded tokens. A
micro-batch runs the model's decoder once; only the hidden states that predict response tokens go
through the LM head, inside ``logprob_entropy``, which never holds [tokens, vocab] logits whole.
The loss is the token mean over the model-written tokens of a whole mini-batch: each micro-batch's
token-mean loss is weighted by its share of those tokens before ``backward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from arpo_fast.algo import policy_loss
from arpo_fast.kernels import logprob_entropy
from arpo_fast.settings import setting


@dataclass
class PackedBatch:
    """A micro-batch: right-padded [b, L] inputs, and flat per-response-token rows and targets."""

    rows: list[int]               # trajectory indices
    input_ids: torch.Tensor       # int64 [b, L]
    attention_mask: torch.Tensor  # int64 [b, L]
    positions: torch.Tensor       # int64 [n]: flat index into [b * L] of each hidden state used
    targets: torch.Tensor         # int64 [n]: the response token that hidden state predicts
    loss_mask: torch.Tensor       # bool [n]
    model_tokens: int             # loss_mask's count, known on the host


def micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices so that each group's padded size (count x longest) stays within
    ``max_tokens`` (a longer sequence goes alone); similar lengths go together."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current] if current else groups


def pack(trajectories, rows: list[int], pad_id: int, device) -> PackedBatch:
    seqs = [trajectories[i].prompt_ids + trajectories[i].response_ids for i in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    attn = torch.zeros((len(rows), width), dtype=torch.int64)
    positions, targets, mask = [], [], []
    for r, (i, seq) in enumerate(zip(rows, seqs)):
        t = trajectories[i]
        ids[r, :len(seq)] = torch.tensor(seq)
        attn[r, :len(seq)] = 1
        start = r * width + len(t.prompt_ids) - 1  # the hidden state before each response token
        positions.extend(range(start, start + len(t.response_ids)))
        targets.extend(t.response_ids)
        mask.extend(t.loss_mask)
    as_dev = lambda x, dt: torch.tensor(x, dtype=dt).to(device)  # noqa: E731
    return PackedBatch(rows, ids.to(device), attn.to(device), as_dev(positions, torch.int64),
                       as_dev(targets, torch.int64), as_dev(mask, torch.bool), sum(mask))


def token_logprobs(model, batch: PackedBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy (fp32 [n]) of each response token under the model at ``temperature``."""
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.positions)
    return logprob_entropy(hidden, model.lm_head.weight, batch.targets, temperature)


@dataclass(frozen=True)
class UpdateConfig:
    """The clipped update (defaults: the reference's)."""

    clip_low: float = setting(0.2, "A token's ratio counts down to 1 - clip_low.")
    clip_high: float = setting(0.2, "A token's ratio counts up to 1 + clip_high.")
    dual_clip: float = setting(3.0, "Bound on the loss of a negative-advantage token, in units of |A| (0: "
                               "no dual clip).")
    entropy_coef: float = setting(0.0, "Weight of the entropy bonus (the reference: 0).")
    grad_clip: float = setting(1.0, "Clip the gradient's global norm to this (0: no clipping).")
    mini_batches: int = setting(1, "Optimizer steps per training step; the trajectories are split between "
                                "them.")
    micro_batch_tokens: int = setting(16384, "Most tokens (prompt and response, padded) in one "
                                      "forward/backward of the update.")

    def __post_init__(self):
        for name in ("clip_low", "clip_high", "entropy_coef", "grad_clip", "dual_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1, got {self.clip_low}")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or 0 for off), got {self.dual_clip}")
        for name in ("mini_batches", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def update(model, optimizer, trajectories, advantages: list[torch.Tensor], cfg: UpdateConfig,
           pad_id: int, temperature: float = 1.0) -> dict[str, float]:
    """Clipped policy-gradient updates over ``trajectories`` (per-token ``advantages``, one tensor
    per trajectory): ``cfg.mini_batches`` steps of ``optimizer`` (a :class:`~arpo_fast.train.optim.MasterWeights`),
    each over a contiguous share.
    Returns the micro-batches' mean metrics (``tokens``: their sum), the last gradient norm and how
    many optimizer steps were skipped for a non-finite gradient."""
    device = next(model.parameters()).device
    n = len(trajectories)
    shares = [list(range(n))[k * n // cfg.mini_batches:(k + 1) * n // cfg.mini_batches]
              for k in range(cfg.mini_batches)]
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]
    plans = [[pack(trajectories, [share[j] for j in g], pad_id, device)
              for g in micro_batches([lengths[i] for i in share], cfg.micro_batch_tokens)]
             for share in shares if share]
    old = {}
    if cfg.mini_batches > 1:  # later mini-batches see a moved policy: keep the rollout policy's values
        with torch.no_grad():
            for batch in (b for plan in plans for b in plan):
                old[id(batch)] = token_logprobs(model, batch, temperature)[0]
    totals: dict[str, float] = {}
    count = skipped = 0
    for plan in plans:
        tokens = sum(b.model_tokens for b in plan)
        for batch in plan:
            logprobs, entropy = token_logprobs(model, batch, temperature)
            adv = torch.cat([advantages[i] for i in batch.rows]).to(device)
            loss, metrics = policy_loss(
                logprobs[None], old.get(id(batch), logprobs.detach())[None], adv[None],
                batch.loss_mask[None], cfg.clip_low, cfg.clip_high, cfg.dual_clip or None,
                entropy=entropy[None], entropy_coef=cfg.entropy_coef)
            (loss * (batch.model_tokens / max(tokens, 1))).backward()
            metrics["loss"] = float(loss.detach())
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
        grad_norm = optimizer.clip_and_step(cfg.grad_clip)
        skipped += not math.isfinite(grad_norm)  # a NaN/inf gradient: the step was dropped
        optimizer.zero_grad()
    # counts add up over micro-batches; rates and losses are their means
    out = {k: v if k == "tokens" else v / max(count, 1) for k, v in totals.items()}
    out["grad_norm"] = grad_norm
    out["skipped_updates"] = float(skipped)
    return out
