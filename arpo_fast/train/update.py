"""The update side of a training step: trajectories' log-probs under the policy, and clipped updates.

A step's trajectories are split into mini-batches of ``mini_batch_prompts`` prompts (whole GRPO
groups), one optimizer step each, as in the reference (128 prompts per step in mini-batches of 16:
8 steps). Each mini-batch is packed into micro-batches of at most ``micro_batch_tokens`` tokens:

- tree-packed (``packed_update``, the default; ``packing.py``, ``tree_batch.py``): each prompt's
  tree is laid out once,
  so the prompt and every branch-shared token go through the model once, with no padding, under a
  mask that keeps each token on its own path (``attention.py``); a shared token's copies meet in
  one loss term (``algo.shared_policy_loss``), exactly the per-copy loss; a tree split over
  several micro-batches runs its prompt once (``contexts.py``);
- per trajectory (``packed_update=False``; ``padded.py``): every trajectory from its first token,
  right-padded (padding-free under flash-attn's varlen kernels), the reference's layout.

Both layouts are a ``batch.Batch``, which this module runs without asking which one it holds.

A micro-batch runs the model's decoder once (each layer's activations checkpointed with
``gradient_checkpointing``); only the hidden states that predict model-written response tokens go
through the LM head, inside ``logprob_entropy``, which never holds [tokens, vocab] logits whole.
The loss is the token mean over the model-written tokens of a whole mini-batch, every copy of a
shared token counted: each micro-batch's token-mean loss is weighted by its share of those tokens
before ``backward``, and the gradients add up in fp32 (``optim.MasterWeights``). Other
``loss_agg`` modes weight each trajectory's tokens through its advantages and divide by the
mini-batch's trajectories instead (``algo.aggregation``).

The ratio's denominator ("old" log-probs) is the policy that rolled out. With ``old_logprobs``
``recompute`` (the reference's way) the trainer computes it: the first mini-batch's forward is
under that policy still, and the later mini-batches get a no-grad forward before the first
optimizer step. The rollout's own log-probs (from the sampler, possibly in bf16 and other kernels)
are compared with those each step (``logprob_mismatch_*``), and with ``rollout_is_cap`` each
token's loss is weighted by the truncated importance ratio min(exp(old - rollout), cap) that
corrects for their difference. With ``rollout`` the sampler's log-probs are the denominator, so
the ratio is against the distribution that drew the tokens and that extra forward is skipped; the
mismatch is then measured on the first mini-batch only (the one whose forward is still under the
rollout policy).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from arpo_fast.algo import kl_k3
from arpo_fast.algo.aggregation import denominator, weighted_advantages
from arpo_fast.rollout.rollout_tree import RolloutTree
from arpo_fast.train.activation_checkpoint import activation_checkpointing
from arpo_fast.train.attention import attention_implementation, check_model
from arpo_fast.train.batch import Batch, LogprobModel
from arpo_fast.train.contexts import ContextCache, context_order
from arpo_fast.train.exchange import redistribute
from arpo_fast.train.optim import StepsPolicy
from arpo_fast.train.packing import pack_trees
from arpo_fast.train.padded import PaddedBatch, micro_batches, pack
from arpo_fast.train.tree_batch import TreeBatch
from arpo_fast.train.update_config import UpdateConfig


@dataclass
class UpdateData:
    """What an update trains on: the rollout's record, per trajectory its tokens' advantages (fp32
    [len(response)]), the pad token, the rollout's temperature, and optionally the trajectories of
    each mini-batch (default: the trajectories of ``mini_batch_prompts`` consecutive prompts)."""

    record: RolloutTree
    advantages: list[torch.Tensor]
    pad_id: int = 0
    temperature: float = 1.0
    mini_batches: Optional[list[list[int]]] = None
    vocab_limit: Optional[int] = None
    """The tokenizer's size where the LM head has rows past it (``Engine.vocab_limit``): log-probs
    and entropies are then over the ids below it, the distribution the rollout sampled from."""
    positions: Optional[list[int]] = None
    """Each of the record's prompts' place in the step (default: its index); a distributed update
    splits mini-batches in this order (``balance.py``)."""

    def groups(self, prompts_per_batch: Optional[int]) -> list[list[int]]:
        if self.mini_batches is not None:
            return self.mini_batches
        if prompts_per_batch is None:  # UpdateConfig's auto: TrainConfig resolves it for a job
            raise ValueError("mini_batch_prompts is auto: give a number of prompts")
        return mini_batches([t.prompt_index for t in self.record.trajectories], prompts_per_batch)


def mini_batches(prompt_index: Sequence[int], prompts_per_batch: int) -> list[list[int]]:
    """Trajectory indices per mini-batch: the trajectories of ``prompts_per_batch`` consecutive
    prompts (in order of first appearance), so a GRPO group is never split."""
    order = list(dict.fromkeys(prompt_index))
    batch_of = {p: k // prompts_per_batch for k, p in enumerate(order)}
    return numbered_mini_batches(
        [batch_of[p] for p in prompt_index], math.ceil(len(order) / prompts_per_batch)
    )


def numbered_mini_batches(batch_of: Sequence[int], count: int) -> list[list[int]]:
    """Trajectory indices per mini-batch from each trajectory's mini-batch number (< ``count``;
    a mini-batch may be empty)."""
    out: list[list[int]] = [[] for _ in range(count)]
    for i, k in enumerate(batch_of):
        out[k].append(i)
    return out


class _Mismatch:
    """The gap between the rollout's log-probs and the trainer's for the same policy, on the
    model-written tokens the sampler drew (each shared token counted once per copy)."""

    def __init__(self):
        self.total = self.count = self.over = 0.0
        self.max = 0.0

    def add(self, trainer: torch.Tensor, rollout: torch.Tensor, weights: torch.Tensor) -> None:
        """``weights``: per token, its copies (0: not model-written)."""
        keep = (weights > 0) & torch.isfinite(rollout)
        diff = torch.where(keep, (trainer.detach().float() - rollout).abs(), 0.0)
        w = torch.where(keep, weights.float(), 0.0)
        if diff.numel():
            total, most, over, count = torch.stack(
                [(w * diff).sum(), diff.max(), (w * (diff > 0.1)).sum(), w.sum()]
            ).tolist()
            self.total += total
            self.max = max(self.max, most)
            self.over += over
            self.count += count

    def metrics(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {
            "logprob_mismatch_mean": self.total / n,
            "logprob_mismatch_max": self.max,
            "logprob_mismatch_share": self.over / n,
        }


def is_weights(old: torch.Tensor, rollout: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(exp(old - rollout), cap) per token (1 where the rollout
    has no log-prob of its own); detached."""
    log_w = (old.detach().float() - rollout).clamp(max=math.log(cap))
    return torch.where(torch.isfinite(rollout), log_w.exp(), torch.ones_like(log_w))


def _sampler_old(rollout: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """The sampler's log-probs as the old policy's; where it drew no token (NaN: an EOS appended
    after a call past the limit) the current policy's, detached, so that token's ratio is 1."""
    rollout = rollout.to(logprobs.device)
    return torch.where(torch.isfinite(rollout), rollout, logprobs.detach())


@dataclass
class _Lockstep:
    """A distributed run's agreement: per mini-batch, how many prompt contexts every rank runs up
    front (``ContextCache.start``), and the pad token of their stand-ins."""

    runs: list[int]
    pad_id: int


@dataclass
class _Totals:
    """What an update adds up over its micro-batches."""

    sums: dict[str, float] = field(default_factory=dict)
    mismatch: _Mismatch = field(default_factory=_Mismatch)
    tokens: int = 0
    skipped: int = 0
    grad_norm: float = 0.0
    forward: int = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def metrics(self, steps: int) -> dict[str, float]:
        out = {k: v / max(self.tokens, 1) for k, v in self.sums.items()}
        out.update(self.mismatch.metrics())
        out.update(
            tokens=float(self.tokens),
            grad_norm=self.grad_norm,
            optimizer_steps=float(steps),
            skipped_updates=float(self.skipped),
            forward_tokens=float(self.forward),
        )
        return out


def update(
    model, optimizer: StepsPolicy, data: UpdateData, cfg: UpdateConfig, *, kl_model=None, dist=None
) -> dict[str, float]:
    """Clipped policy-gradient updates over ``data``: one step of ``optimizer``
    (``optim.MasterWeights``, or the sharded policy of a distributed run) per mini-batch.

    ``model``: the policy, or a ``batch.LogprobModel`` (sharded with FSDP2 in a distributed run).
    ``kl_model``: the frozen policy the KL penalty is taken against (the same kinds), needed when
    ``cfg.kl_coef`` > 0.
    ``dist``: this rank of a distributed run (``distributed.Dist``): each mini-batch's trajectories
    are first spread over every rank by tokens (``balance.py``, ``exchange.py``; give
    ``data.mini_batches`` numbered the same on every rank, and ``data.positions``), the token-mean's
    denominator is the count over every rank, and every rank runs the same number of micro-batches.

    Returns the loss's metrics as token-weighted means over this process's tokens (``tokens``:
    their count, every copy of a shared token included), the rollout/trainer log-prob mismatch, the
    last gradient norm, the optimizer steps taken, how many were skipped for a non-finite gradient,
    the tokens that went through the model (``forward_tokens``), and in a distributed run the
    split's metrics (``exchange.redistribute``)."""
    scorer = model if isinstance(model, LogprobModel) else LogprobModel(model)
    device = next(scorer.parameters()).device
    attention, checkpointing = cfg.resolved(device)
    check_model(scorer.policy, cfg.packed_update)
    if cfg.kl_coef and kl_model is None:
        raise ValueError("kl_coef > 0 needs the reference policy (kl_model)")
    if kl_model is not None and not isinstance(kl_model, LogprobModel):
        kl_model = LogprobModel(kl_model)
    if data.vocab_limit is not None:  # else each keeps its own (LogprobModel's default: None)
        for m in (scorer, kl_model) if kl_model is not None else (scorer,):
            m.vocab_limit = data.vocab_limit
    rows = cfg.packed_update or attention == "flash_attention_2"  # padding-free rows
    groups, spread = data.groups(cfg.mini_batch_prompts), {}
    if dist is not None and dist.world > 1:  # every mini-batch over every rank (balance.py)
        data, spread = redistribute(data, groups, cfg.packed_update, dist)
        assert data.mini_batches is not None, "redistribute numbers the mini-batches it spreads"
        groups = data.mini_batches
    plans = [_plan(data, group, cfg, rows, device) for group in groups]
    mode = cfg.loss_agg or "token-mean"  # the loss's divisor Z (algo.aggregation), summed over ranks
    totals = [denominator(mode, sum(b.model_tokens for b in p), len(g)) for p, g in zip(plans, groups)]
    lockstep = None
    if dist is not None:
        stand_in = TreeBatch.stand_in if rows else PaddedBatch.stand_in
        totals, lockstep = _in_lockstep(
            dist, plans, totals, lambda: stand_in(data.pad_id, device), data.pad_id
        )
    run = _Update(
        scorer=scorer,
        kl_model=kl_model,
        optimizer=optimizer,
        cfg=cfg,
        temperature=data.temperature,
        attention=attention,
        lockstep=lockstep,
    )
    with contextlib.ExitStack() as stack:
        for m in (scorer, kl_model) if kl_model is not None else (scorer,):
            stack.enter_context(attention_implementation(m.policy, attention, packed=cfg.packed_update))
        stack.enter_context(activation_checkpointing(scorer.policy, checkpointing))
        return run.all(plans, totals) | spread


def _plan(data: UpdateData, group: list[int], cfg: UpdateConfig, rows: bool, device) -> list[Batch]:
    """The micro-batches of one mini-batch (trajectories ``group``) on ``device``: padding-free
    ``rows`` (trees when ``cfg.packed_update``, with split trees' groups one after another, so that
    their prompt context runs once), else padded rows."""
    mode, budget = cfg.loss_agg or "token-mean", cfg.micro_batch_tokens
    advantages = weighted_advantages(data.record, data.advantages, group, mode, budget)
    if rows:
        packed = pack_trees(data.record, advantages, group, cfg.micro_batch_tokens, share=cfg.packed_update)
        return context_order([b.to(device) for b in packed])
    trajectories = data.record.trajectories
    lengths = [len(trajectories[i].prompt_ids) + trajectories[i].response_length for i in group]
    return [
        pack(trajectories, [group[j] for j in g], data.pad_id, device, advantages)
        for g in micro_batches(lengths, cfg.micro_batch_tokens)
    ]


def _in_lockstep(
    dist, plans: list[list[Batch]], totals: list[int], stand_in: Callable[[], Batch], pad_id: int
) -> tuple[list, _Lockstep]:
    """Token counts over every rank, and the same number of micro-batches (``stand_in()`` ones
    added) and of prompt-context runs (``contexts.py``, stand-ins of ``pad_id``) on every rank."""
    totals = dist.sum(totals)
    counts = dist.max([len(plan) for plan in plans])
    for plan, count in zip(plans, counts):
        plan.extend(stand_in() for _ in range(int(count) - len(plan)))
    runs = dist.max([len({id(c) for b in plan for c in b.contexts}) for plan in plans])
    return totals, _Lockstep([int(r) for r in runs], pad_id)


@dataclass
class _Update:
    """One update's models and settings, and its passes over the mini-batches."""

    scorer: LogprobModel
    kl_model: Optional[LogprobModel]
    optimizer: StepsPolicy
    cfg: UpdateConfig
    temperature: float
    attention: str
    lockstep: Optional[_Lockstep] = None

    def all(self, plans: list[list[Batch]], totals: list[int]) -> dict[str, float]:
        done = _Totals()
        old = self.old_logprobs(plans, done)
        for k, (plan, total) in enumerate(zip(plans, totals)):
            self.mini_batch(k, plan, total, old, done)
        return done.metrics(len(plans))

    def cache(self, model, trainable: bool, plan: list[Batch], k: int) -> ContextCache:
        """The prompt contexts of mini-batch ``k`` for ``model``: run up front in lockstep."""
        cache = ContextCache(model, self.temperature, self.attention, trainable)
        if self.lockstep is not None and model is not None:
            cache.start(plan, self.lockstep.runs[k], self.lockstep.pad_id)
        return cache

    @torch.no_grad()
    def old_logprobs(self, plans: list[list[Batch]], done: _Totals) -> dict[int, torch.Tensor]:
        """Later mini-batches see a moved policy: the rollout policy's log-probs of theirs, now
        (none with ``old_logprobs`` rollout: the sampler's stand in)."""
        old: dict[int, torch.Tensor] = {}
        if self.cfg.old_logprobs == "rollout":
            return old
        for k, plan in enumerate(plans[1:], 1):
            cache = self.cache(self.scorer, False, plan, k)
            for batch in plan:
                old[id(batch)] = self.scorer(batch, self.temperature, self.attention, cache.kv(batch))[0]
                cache.done(batch)
            cache.finish()
            done.forward += cache.tokens
        return old

    def mini_batch(self, k: int, plan: list[Batch], total: int, old: dict, done: _Totals) -> None:
        """Forward and backward over mini-batch ``k`` (``total``: its model-written tokens on every
        rank), then one optimizer step."""
        cfg = self.cfg
        cache = self.cache(self.scorer, True, plan, k)
        kl_cache = self.cache(self.kl_model if cfg.kl_coef else None, False, plan, k)
        for batch in plan:
            self.micro_batch(batch, total, old, (cache, kl_cache), done, first=k == 0)
        cache.finish()  # the contexts run up front (distributed) go back
        kl_cache.finish()
        done.forward += cache.tokens
        done.grad_norm = self.optimizer.clip_and_step(cfg.grad_clip)
        done.skipped += not math.isfinite(done.grad_norm)  # a NaN/inf gradient: the step was dropped
        self.optimizer.zero_grad()

    def micro_batch(
        self, batch: Batch, total: int, old: dict, caches, done: _Totals, first: bool = True
    ) -> None:
        cache, kl_cache = caches
        logprobs, entropy = self.scorer(batch, self.temperature, self.attention, cache.kv(batch))
        trainer_old = old.get(id(batch), logprobs.detach())  # the rollout policy's, by the trainer
        rollout = self.cfg.old_logprobs == "rollout"
        old_lp = _sampler_old(batch.rollout_logprobs, logprobs) if rollout else trainer_old
        ref_lp = None
        if self.cfg.kl_coef:
            assert self.kl_model is not None, "update() checks that kl_coef > 0 comes with kl_model"
            with torch.no_grad():
                ref_lp = self.kl_model(batch, self.temperature, self.attention, kl_cache.kv(batch))[0]
                kl_cache.done(batch)
        if batch.dummy:  # gradients of zero, collectives as on the other ranks
            (logprobs.sum() * 0.0).backward()
            return
        if first or not rollout:  # later mini-batches' trainer log-probs are a moved policy's
            done.mismatch.add(trainer_old, batch.rollout_logprobs, batch.copy_counts)
        loss, metrics = self.loss(batch, logprobs, old_lp, entropy, ref_lp, done)
        (loss * (batch.model_tokens / max(total, 1))).backward()  # FSDP2 sums over ranks
        cache.done(batch)  # a split tree's last group: its prompt context's backward
        metrics.pop("tokens")
        metrics["loss"] = float(loss.detach())
        done.add({key: v * batch.model_tokens for key, v in metrics.items()})
        done.tokens += batch.model_tokens
        done.forward += batch.tokens * (2 if id(batch) in old else 1)

    def loss(self, batch: Batch, logprobs, old_lp, entropy, ref_lp, done: _Totals):
        """The micro-batch's token-mean loss and metrics (the importance weights' sum into
        ``done``); with ``ref_lp`` (the KL model's log-probs) the KL penalty too."""
        cfg = self.cfg
        weights = (
            is_weights(old_lp, batch.rollout_logprobs, cfg.rollout_is_cap) if cfg.rollout_is_cap else None
        )
        if weights is not None:
            done.add({"is_weight": float((weights * batch.copy_counts).sum())})
        loss, metrics = batch.policy_loss(logprobs, old_lp, entropy, weights, cfg)
        if ref_lp is not None:
            kl = batch.token_mean(kl_k3(logprobs, ref_lp))
            loss = loss + cfg.kl_coef * kl
            metrics["kl"] = float(kl.detach())
        return loss, metrics
