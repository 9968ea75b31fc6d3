"""The update side of a training step: trajectories' log-probs under the policy, and clipped updates.

A step's trajectories are split into mini-batches of ``mini_batch_prompts`` prompts (whole GRPO
groups), one optimizer step each, as in the reference (128 prompts per step in mini-batches of 16:
8 steps). Each mini-batch is packed into micro-batches of at most ``micro_batch_tokens`` tokens:

- tree-packed (``packed_update``, the default; ``packing.py``): each prompt's tree is laid out once,
  so the prompt and every branch-shared token go through the model once, with no padding, under a
  mask that keeps each token on its own path (``attention.py``); a shared token's copies meet in
  one loss term (``algo.shared_policy_loss``), exactly the per-copy loss; a tree split over
  several micro-batches runs its prompt once (``contexts.py``);
- per trajectory (``packed_update=False``): every trajectory from its first token, right-padded
  (padding-free under flash-attn's varlen kernels), the reference's layout.

A micro-batch runs the model's decoder once (each layer's activations checkpointed with
``gradient_checkpointing``); only the hidden states that predict model-written response tokens go
through the LM head, inside ``logprob_entropy``, which never holds [tokens, vocab] logits whole.
The loss is the token mean over the model-written tokens of a whole mini-batch, every copy of a
shared token counted: each micro-batch's token-mean loss is weighted by its share of those tokens
before ``backward``, and the gradients add up in fp32 (``optim.MasterWeights``).

The ratio's denominator ("old" log-probs) is the policy that rolled out, recomputed by the trainer
before the first optimizer step. The rollout's own log-probs (from the sampler, possibly in bf16
and other kernels) are compared with those each step (``logprob_mismatch_*``), and with
``rollout_is_cap`` each token's loss is weighted by the truncated importance ratio
min(exp(old - rollout), cap) that corrects for their difference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from arpo_fast.algo import CopyAdvantages, aggregate, kl_k3, policy_loss, shared_policy_loss
from arpo_fast.kernels import logprob_entropy
from arpo_fast.rollout.rollout_tree import RolloutTree
from arpo_fast.train.attention import (
    activation_checkpointing,
    attention_implementation,
    check_model,
    path_masks,
    tree_mask,
)
from arpo_fast.train.contexts import context_order, plan_cache
from arpo_fast.train.packing import PromptContext, TreeBatch, pack_trees
from arpo_fast.train.update_config import UpdateConfig


@dataclass
class PackedBatch:
    """A micro-batch: right-padded [b, L] inputs, and flat per-response-token rows and targets."""

    rows: list[int]  # trajectory indices
    input_ids: torch.Tensor  # int64 [b, L]
    attention_mask: torch.Tensor  # int64 [b, L]
    positions: torch.Tensor  # int64 [n]: flat index into [b * L] of each hidden state used
    targets: torch.Tensor  # int64 [n]: the response token that hidden state predicts
    loss_mask: torch.Tensor  # bool [n]
    rollout_logprobs: torch.Tensor  # fp32 [n]: the sampler's (NaN for a token it did not sample)
    model_tokens: int  # loss_mask's count, known on the host


def mini_batches(prompt_index: Sequence[int], prompts_per_batch: int) -> list[list[int]]:
    """Trajectory indices per mini-batch: the trajectories of ``prompts_per_batch`` consecutive
    prompts (in order of first appearance), so a GRPO group is never split."""
    order = list(dict.fromkeys(prompt_index))
    batch_of = {p: k // prompts_per_batch for k, p in enumerate(order)}
    out: list[list[int]] = [[] for _ in range(math.ceil(len(order) / prompts_per_batch))]
    for i, p in enumerate(prompt_index):
        out[batch_of[p]].append(i)
    return out


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
    positions, targets, mask, rollout = [], [], [], []
    for r, (i, seq) in enumerate(zip(rows, seqs)):
        t = trajectories[i]
        ids[r, : len(seq)] = torch.tensor(seq)
        attn[r, : len(seq)] = 1
        start = r * width + len(t.prompt_ids) - 1  # the hidden state before each response token
        positions.extend(range(start, start + len(t.response_ids)))
        targets.extend(t.response_ids)
        mask.extend(t.loss_mask)
        known = len(t.logprobs) == len(t.response_ids)
        rollout.extend(t.logprobs if known else [math.nan] * len(t.response_ids))
    as_dev = lambda x, dt: torch.tensor(x, dtype=dt).to(device)  # noqa: E731
    return PackedBatch(
        rows,
        ids.to(device),
        attn.to(device),
        as_dev(positions, torch.int64),
        as_dev(targets, torch.int64),
        as_dev(mask, torch.bool),
        as_dev(rollout, torch.float32),
        sum(mask),
    )


def token_logprobs(model, batch: PackedBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy (fp32 [n]) of each response token under the model at ``temperature``."""
    hidden = model.model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.positions)
    return logprob_entropy(hidden, model.lm_head.weight, batch.targets, temperature)


def tree_logprobs(
    model, batch: TreeBatch, temperature: float, implementation: str, context=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy (fp32 [n]) of each predicted token of a packed row, the model's
    attention running as ``implementation`` (set with ``attention.attention_implementation``);
    ``context``: the keys and values of the row's prompt contexts (``contexts.ContextCache``)."""
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
    hidden = model.model(
        input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False, **attend
    ).last_hidden_state[0]
    return logprob_entropy(
        hidden.index_select(0, batch.hidden_index), model.lm_head.weight, batch.targets, temperature
    )


class LogprobModel(torch.nn.Module):
    """The policy as the update uses it: ``forward(batch, temperature, attention, context)``
    returns the log-probs and entropies of a micro-batch's predicted tokens (:func:`token_logprobs`
    for a :class:`PackedBatch`, :func:`tree_logprobs` for a ``TreeBatch``), or for a
    ``PromptContext`` the decoder's output on it (its keys and values go to ``context``, an
    ``attention.ContextRun``). One module call, so that under FSDP2 the root's parameters
    (embedding, final norm, LM head) are gathered for exactly that computation."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch, temperature: float, attention: str = "sdpa", context=None):
        if isinstance(batch, PromptContext):  # a prompt context alone; ``context``: its ContextRun
            ids = batch.input_ids.to(self.policy.device)[None]
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
            return self.policy.model(
                input_ids=ids, position_ids=positions, use_cache=False, tree_context=context
            ).last_hidden_state
        if isinstance(batch, TreeBatch):
            logprobs, entropy = tree_logprobs(self.policy, batch, temperature, attention, context)
        else:
            logprobs, entropy = token_logprobs(self.policy, batch, temperature)
        return logprobs.clone(), entropy.clone()  # not views: FSDP2 hooks the outputs for backward


def _dummy_batch(pad_id: int, device, packed: bool):
    """One token that counts for nothing: a rank with fewer micro-batches than the others runs
    these, so that every rank makes the same collective calls."""
    one = torch.tensor([0], dtype=torch.int64, device=device)
    pad = torch.full((1,), pad_id, dtype=torch.int64, device=device)
    nan = torch.full((1,), math.nan, device=device)
    if packed:
        zero = torch.zeros(1, device=device)
        return TreeBatch(
            pad,
            one,
            one + 1,
            one,
            pad,
            CopyAdvantages(zero, zero, zero, zero, zero),
            nan,
            torch.zeros(1, 2, dtype=torch.int64, device=device),
            one,
            [(1, 1)],
            [0, 1],
            0,
            dummy=True,
        )
    return PackedBatch(
        [],
        pad[None],
        torch.ones((1, 1), dtype=torch.int64, device=device),
        one,
        pad,
        torch.zeros(1, dtype=torch.bool, device=device),
        nan,
        0,
    )


def _is_dummy(batch) -> bool:
    return batch.dummy if isinstance(batch, TreeBatch) else not batch.rows


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


def _plans(
    record: RolloutTree,
    advantages,
    cfg: UpdateConfig,
    pad_id: int,
    device,
    attention: str,
    groups: list[list[int]],
) -> list[list]:
    """Per mini-batch (``groups`` of trajectory indices), its micro-batches on ``device``; split
    trees run their prompt once (``packing.PromptContext``), and the groups of a tree come one
    after another."""
    if cfg.packed_update or attention == "flash_attention_2":  # padding-free rows
        plans = [
            [
                b.to(device)
                for b in pack_trees(
                    record, advantages, share, cfg.micro_batch_tokens, share=cfg.packed_update
                )
            ]
            for share in groups
        ]
        return [context_order(plan) for plan in plans]
    trajectories = record.trajectories
    lengths = [len(t.prompt_ids) + t.response_length for t in trajectories]
    return [
        [
            pack(trajectories, [share[j] for j in g], pad_id, device)
            for g in micro_batches([lengths[i] for i in share], cfg.micro_batch_tokens)
        ]
        for share in groups
    ]


def _weights(batch) -> torch.Tensor:
    """Per predicted token, how many model-written tokens it stands for."""
    return batch.copies.count if isinstance(batch, TreeBatch) else batch.loss_mask.float()


def _forward_tokens(batch) -> int:
    """The row's tokens (its prompt contexts are counted once each, by ``ContextCache``)."""
    return batch.tokens if isinstance(batch, TreeBatch) else batch.input_ids.numel()


def _loss(batch, logprobs, old_lp, entropy, ref_lp, advantages, cfg: UpdateConfig, sums: dict):
    """The micro-batch's token-mean loss and metrics (the importance weights' sum into ``sums``);
    with ``ref_lp`` (the reference policy's log-probs) the KL penalty too."""
    cap = cfg.rollout_is_cap
    weights = is_weights(old_lp, batch.rollout_logprobs, cap) if cap else None
    if weights is not None:
        _add(sums, {"is_weight": float((weights * _weights(batch)).sum())})
    clip = (cfg.clip_low, cfg.clip_high, cfg.dual_clip or None)
    if isinstance(batch, TreeBatch):
        copies = batch.copies if weights is None else batch.copies.scaled(weights)
        loss, metrics = shared_policy_loss(
            logprobs, old_lp, copies, *clip, entropy=entropy, entropy_coef=cfg.entropy_coef
        )
    else:
        adv = torch.cat([advantages[i] for i in batch.rows]).to(logprobs.device)
        if weights is not None:  # a weight w >= 0 on a token's clipped loss is a weight on its A
            adv = adv * weights
        loss, metrics = policy_loss(
            logprobs[None],
            old_lp[None],
            adv[None],
            batch.loss_mask[None],
            *clip,
            entropy=entropy[None],
            entropy_coef=cfg.entropy_coef,
        )
    if ref_lp is not None:
        kl = _token_mean(kl_k3(logprobs, ref_lp), batch)
        loss = loss + cfg.kl_coef * kl
        metrics["kl"] = float(kl.detach())
    return loss, metrics


def _token_mean(values: torch.Tensor, batch) -> torch.Tensor:
    """Mean over the micro-batch's model-written tokens, each shared token once per copy."""
    if not isinstance(batch, TreeBatch):
        return aggregate(values, batch.loss_mask)
    count = batch.copies.count
    return torch.where(count > 0, values * count, 0.0).sum() / count.sum().clamp_min(1)


def update(
    model,
    optimizer,
    record: RolloutTree,
    advantages: list[torch.Tensor],
    cfg: UpdateConfig,
    pad_id: int,
    temperature: float = 1.0,
    *,
    dist=None,
    mini_batch_ids: Optional[Sequence[int]] = None,
    num_mini_batches: int = 0,
    reference=None,
) -> dict[str, float]:
    """Clipped policy-gradient updates over the trajectories of ``record`` (per-token ``advantages``,
    one tensor per trajectory): one step of ``optimizer`` (``optim.MasterWeights``, or the sharded policy of a
    distributed run) per mini-batch of ``cfg.mini_batch_prompts`` prompts.

    ``model``: the policy, or a :class:`LogprobModel` (sharded with FSDP2 in a distributed run).
    ``reference``: the frozen starting policy (the same kinds), needed when ``cfg.kl_coef`` > 0.
    ``dist``: this rank of a distributed run (``distributed.Dist``): the token-mean's denominator is
    then the count over every rank, and every rank runs the same number of micro-batches. With
    ``mini_batch_ids`` (per trajectory, < ``num_mini_batches``) the caller says which mini-batch each
    trajectory belongs to (the same numbering on every rank).

    Returns the loss's metrics as token-weighted means over this process's tokens (``tokens``:
    their count, every copy of a shared token included), the rollout/trainer log-prob mismatch, the
    last gradient norm, the optimizer steps taken, how many were skipped for a non-finite gradient,
    and the tokens that went through the model (``forward_tokens``)."""
    scorer = model if isinstance(model, LogprobModel) else LogprobModel(model)
    device = next(scorer.parameters()).device
    attention, checkpointing = cfg.resolved(device)
    check_model(scorer.policy, cfg.packed_update)
    if cfg.kl_coef and reference is None:
        raise ValueError("kl_coef > 0 needs the reference policy")
    if reference is not None and not isinstance(reference, LogprobModel):
        reference = LogprobModel(reference)
    if mini_batch_ids is None:
        groups = mini_batches([t.prompt_index for t in record.trajectories], cfg.mini_batch_prompts)
    else:
        groups = [[] for _ in range(num_mini_batches)]
        for i, k in enumerate(mini_batch_ids):
            groups[k].append(i)
    plans = _plans(record, advantages, cfg, pad_id, device, attention, groups)
    plan_tokens = [sum(b.model_tokens for b in plan) for plan in plans]
    lockstep = None
    if dist is not None:  # global token counts; the same number of micro-batches on every rank
        plan_tokens = dist.sum(plan_tokens)
        counts = dist.max([len(plan) for plan in plans])
        plans = [
            plan
            + [
                _dummy_batch(pad_id, device, cfg.packed_update or attention == "flash_attention_2")
                for _ in range(int(c) - len(plan))
            ]
            for plan, c in zip(plans, counts)
        ]
        # and as many prompt-context runs, up front (contexts.py)
        runs = dist.max([len({id(c) for b in plan for c in getattr(b, "contexts", [])}) for plan in plans])
        lockstep = ([int(r) for r in runs], pad_id)
    scale = dist.world if dist is not None else 1  # FSDP averages gradients over ranks; we want the sum
    with contextlib.ExitStack() as stack:
        for m in (scorer, reference) if reference is not None else (scorer,):
            stack.enter_context(attention_implementation(m.policy, attention, packed=cfg.packed_update))
        stack.enter_context(activation_checkpointing(scorer.policy, checkpointing))
        return _run(
            scorer,
            reference,
            optimizer,
            plans,
            plan_tokens,
            scale,
            advantages,
            cfg,
            temperature,
            attention,
            lockstep,
        )


def _run(
    scorer,
    reference,
    optimizer,
    plans,
    plan_tokens,
    scale: float,
    advantages,
    cfg: UpdateConfig,
    temperature: float,
    attention: str,
    lockstep=None,
) -> dict:
    old, forward = {}, 0
    with torch.no_grad():  # later mini-batches see a moved policy: keep the rollout policy's values
        for k, plan in enumerate(plans[1:], 1):
            cache = plan_cache(scorer, temperature, attention, False, plan, lockstep, k)
            for batch in plan:
                old[id(batch)] = scorer(batch, temperature, attention, cache.kv(batch))[0]
                cache.done(batch)
            cache.finish()
            forward += cache.tokens
    sums: dict[str, float] = {}
    mismatch = _Mismatch()
    tokens = skipped = 0
    grad_norm = 0.0
    for k, (plan, total) in enumerate(zip(plans, plan_tokens)):
        cache = plan_cache(scorer, temperature, attention, True, plan, lockstep, k)
        ref_cache = plan_cache(
            reference if cfg.kl_coef else None, temperature, attention, False, plan, lockstep, k
        )
        for batch in plan:
            logprobs, entropy = scorer(batch, temperature, attention, cache.kv(batch))
            old_lp = old.get(id(batch), logprobs.detach())
            ref_lp = None
            if cfg.kl_coef:
                with torch.no_grad():
                    ref_lp = reference(batch, temperature, attention, ref_cache.kv(batch))[0]
                    ref_cache.done(batch)
            if _is_dummy(batch):  # gradients of zero, collectives as on the other ranks
                (logprobs.sum() * 0.0).backward()
                continue
            mismatch.add(old_lp, batch.rollout_logprobs, _weights(batch))
            loss, metrics = _loss(batch, logprobs, old_lp, entropy, ref_lp, advantages, cfg, sums)
            (loss * (batch.model_tokens * scale / max(total, 1))).backward()
            cache.done(batch)  # a split tree's last group: its prompt context's backward
            metrics.pop("tokens")
            metrics["loss"] = float(loss.detach())
            _add(sums, {k: v * batch.model_tokens for k, v in metrics.items()})
            tokens += batch.model_tokens
            forward += _forward_tokens(batch) * (2 if id(batch) in old else 1)
        cache.finish()  # the contexts run up front (distributed) go back
        ref_cache.finish()
        forward += cache.tokens
        grad_norm = optimizer.clip_and_step(cfg.grad_clip)
        skipped += not math.isfinite(grad_norm)  # a NaN/inf gradient: the step was dropped
        optimizer.zero_grad()
    out = {k: v / max(tokens, 1) for k, v in sums.items()}
    out.update(mismatch.metrics())
    out.update(
        tokens=float(tokens),
        grad_norm=grad_norm,
        optimizer_steps=float(len(plans)),
        skipped_updates=float(skipped),
        forward_tokens=float(forward),
    )
    return out


def _add(totals: dict[str, float], values: dict[str, float]) -> None:
    for key, value in values.items():
        totals[key] = totals.get(key, 0.0) + value
