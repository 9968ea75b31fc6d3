"""Clipped policy-gradient loss (PPO/GRPO with dual clip), token-mean over model-written tokens.

Tokens the model did not write (tool results, the prompt, padding) carry mask 0 and take no part in
the loss, its gradient or the metrics; whatever values they hold (NaN or -inf log-probs included)
cannot leak into the result.

A token on a prefix that several trajectories share has one log-prob, so one ratio r, for all of
its copies, and the clipped loss is positively homogeneous in the advantage: a copy's loss is |A|
times that of A = +1 or -1. So the copies' losses add up to

    -(sum of A+) * min(r, 1 + clip_high) + (sum of |A-|) * min(max(r, 1 - clip_low), dual_clip)

(without dual clip the second factor is max(r, 1 - clip_low)), and every metric to a count of
copies with A > 0, A < 0 and A = 0: :func:`shared_policy_loss` computes a shared token once and
equals :func:`policy_loss` over all of its copies. Hard attribution (one advantage for every copy)
is the case where the copies agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# exp() of a log-ratio past this overflows fp32 long before it matters: beyond it the token is
# clipped anyway, and clamping keeps inf * 0 = NaN out of the backward pass.
MAX_LOG_RATIO = 20.0


def aggregate(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean: the sum of ``values`` where ``mask`` is set, over the number of such tokens.

    ``values`` and ``mask`` share a shape; ``mask`` is bool or numeric (nonzero counts). An empty
    mask gives 0, with a zero (not NaN) gradient.
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    total = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / m.sum().clamp_min(1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, bound: float = 10.0) -> torch.Tensor:
    """Per-token KL(policy || reference), the low-variance k3 estimator on sampled tokens:
    ``exp(ref - lp) - (ref - lp) - 1``, >= 0, with ``ref - lp`` clamped to +-20 and the result to
    [0, ``bound``] (verl's ``low_var_kl``). The gradient flows into ``logprobs`` only.

    Args:
        logprobs: float [...], the current policy's log-probs of the sampled tokens.
        ref_logprobs: float [...], the frozen reference policy's (treated as constant).
    """
    diff = (ref_logprobs.detach().to(logprobs.dtype) - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return (diff.exp() - diff - 1).clamp(0.0, bound)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss of a batch of responses, with dual clip for negative advantages.

    Per token, with ``ratio = exp(logprobs - old_logprobs)``::

        loss = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        loss = min(loss, -A * dual_clip)            # only where A < 0, when dual_clip is set

    then the token-mean over ``mask``, minus ``entropy_coef`` times the token-mean of ``entropy``.
    The log-ratio is clamped to +-``MAX_LOG_RATIO`` (20) first, for the loss and the metrics alike.

    Args:
        logprobs: [B, T] float, log-probabilities of the taken tokens under the current policy;
            the gradient flows into it.
        old_logprobs: [B, T] float, the same under the policy that sampled them (treated as constant).
        advantages: [B, T] or [B] float (a [B] tensor applies to every token of its row; treated as
            constant).
        mask: [B, T] bool or numeric, nonzero where the token is model-written and counts.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high]; 0 <= clip_low < 1,
            clip_high >= 0.
        dual_clip: the cap c > 1 on the loss of a token with A < 0, as a multiple of -A; None turns
            it off.
        entropy: [B, T] float, per-token entropy of the current policy; needed when entropy_coef != 0.
        entropy_coef: weight of the entropy bonus (positive rewards higher entropy).

    Returns:
        ``(loss, metrics)``: loss is a 0-d tensor in float32 (float64 for float64 inputs; bf16 and
        fp16 inputs are upcast). metrics holds python floats, all token-means over ``mask``:
        ``clip_fraction`` (the clamped branch is the larger one), ``dual_clip_fraction``,
        ``approx_kl`` (k1 estimator, mean of old - new log-prob, what the reference logs as ppo_kl),
        ``approx_kl_k3`` (mean of ratio - 1 - log ratio: >= 0, lower variance), ``ratio_mean``,
        ``entropy`` (when given) and ``tokens`` (the count). With an empty mask the loss is 0 with a
        zero gradient and every metric is 0.
    """
    _check_shapes(logprobs, old_logprobs, advantages, mask, entropy)
    _check_params(clip_low, clip_high, dual_clip, entropy is not None, entropy_coef)
    m = mask if mask.dtype == torch.bool else mask != 0
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    log_ratio, adv = _masked_inputs(logprobs, old_logprobs, advantages, m, dtype)
    per_token, stats = _clipped_loss(log_ratio, adv, clip_low, clip_high, dual_clip)
    loss = aggregate(per_token, m)
    if entropy is not None:
        ent = entropy.to(dtype)
        if entropy_coef != 0:
            loss = loss - entropy_coef * aggregate(ent, m)
        stats["entropy"] = ent
    metrics = _metrics(stats, m)
    return loss, metrics


def _masked_inputs(logprobs, old_logprobs, advantages, m, dtype):
    """(log-ratio, advantage) per token [B, T] in ``dtype``, both 0 where ``m`` is unset; the
    log-ratio is clamped to +-MAX_LOG_RATIO. Only the log-ratio carries a gradient."""
    lp = logprobs.to(dtype)
    old = old_logprobs.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    adv = adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    # Masked tokens may hold anything; zero their inputs so their ratio is 1 and gradients are clean.
    log_ratio = torch.where(m, lp - old, zero).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return log_ratio, torch.where(m, adv, zero)


def _clipped_loss(log_ratio, adv, clip_low, clip_high, dual_clip):
    """The clipped (and dual-clipped) loss per token, and the per-token statistics that the
    metrics average, by name."""
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clamped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clamped)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    stats = {
        "clip_fraction": clamped > unclipped,
        "dual_clip_fraction": dual_active,
        "approx_kl": -log_ratio,
        "approx_kl_k3": ratio - 1.0 - log_ratio,
        "ratio_mean": ratio,
    }
    return per_token, stats


def _metrics(
    stats: dict[str, torch.Tensor], m: torch.Tensor, count: torch.Tensor | None = None
) -> dict[str, float]:
    """Token-means of each statistic, fetched from the device in one transfer. With ``count`` (each
    token's copies), ``stats`` hold each token's sum over its copies and the means are over copies."""
    with torch.no_grad():
        if count is None:
            means = [aggregate(v.detach().to(torch.float64), m) for v in stats.values()]
            n = m.sum().to(torch.float64)
        else:
            n = torch.where(m, count, 0).to(torch.float64).sum()
            means = [
                torch.where(m, v.detach().to(torch.float64), 0.0).sum() / n.clamp_min(1)
                for v in stats.values()
            ]
        values = torch.stack([*means, n]).tolist()
    return dict(zip([*stats, "tokens"], values))


@dataclass
class CopyAdvantages:
    """Per token (each [n], fp32): what its copies bring to :func:`shared_policy_loss`. ``count`` is
    also the token's weight in every token-mean (loss, entropy, metrics; a KL term would use it too)."""

    pos: torch.Tensor  # sum over copies of max(A, 0)
    neg: torch.Tensor  # sum over copies of max(-A, 0)
    n_pos: torch.Tensor  # copies with A > 0
    n_neg: torch.Tensor  # copies with A < 0
    count: torch.Tensor  # copies

    NAMES = ("pos", "neg", "n_pos", "n_neg", "count")

    @classmethod
    def of(cls, adv: torch.Tensor) -> CopyAdvantages:
        """From the advantages of every copy: [copies, n]."""
        adv = adv.float()
        return cls(
            adv.clamp(min=0).sum(0),
            (-adv).clamp(min=0).sum(0),
            (adv > 0).sum(0).float(),
            (adv < 0).sum(0).float(),
            torch.full((adv.shape[1],), float(adv.shape[0])),
        )

    @classmethod
    def cat(cls, parts: list[CopyAdvantages]) -> CopyAdvantages:
        if not parts:
            return cls(*(torch.zeros(0) for _ in cls.NAMES))
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in cls.NAMES))

    def select(self, index: torch.Tensor) -> CopyAdvantages:
        return CopyAdvantages(*(getattr(self, name)[index] for name in self.NAMES))

    def scaled(self, weight: torch.Tensor) -> CopyAdvantages:
        """Every copy's advantage times ``weight`` (>= 0, per token): the sums scale, counts stay."""
        return CopyAdvantages(self.pos * weight, self.neg * weight, self.n_pos, self.n_neg, self.count)

    def to(self, device) -> CopyAdvantages:
        return CopyAdvantages(*(getattr(self, name).to(device) for name in self.NAMES))


def shared_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    copies: CopyAdvantages,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`policy_loss` of every copy of each token, each token computed once (module docstring).

    Args:
        logprobs: [n] float, the current policy's log-prob of each token (the gradient flows into it).
        old_logprobs: [n] float, the rollout policy's (treated as constant).
        copies: per token, its copies' advantage sums and counts; a token with ``count`` 0 takes no part.
        clip_low, clip_high, dual_clip, entropy ([n]), entropy_coef: as in :func:`policy_loss`.

    Returns:
        ``(loss, metrics)`` equal to ``policy_loss`` over all copies: the loss is the sum over copies
        divided by their number, the metrics (the same names; ``tokens`` counts copies) are means
        over copies.
    """
    if logprobs.dim() != 1 or _shape(old_logprobs) != tuple(logprobs.shape):
        raise ValueError(
            f"logprobs and old_logprobs must be [n]; got {_shape(logprobs)} and {_shape(old_logprobs)}"
        )
    _check_params(clip_low, clip_high, dual_clip, entropy is not None, entropy_coef)
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    count = copies.count.to(dtype)
    m = count > 0
    log_ratio, ones = (
        x[0]
        for x in _masked_inputs(
            logprobs[None], old_logprobs[None], torch.ones_like(count)[None], m[None], dtype
        )
    )
    # a copy's loss and statistics depend on its advantage's sign only, its loss scaling with |A|
    (up, up_stats), (down, down_stats), (_, flat_stats) = (
        _clipped_loss(log_ratio, sign * ones, clip_low, clip_high, dual_clip) for sign in (1.0, -1.0, 0.0)
    )
    n_pos, n_neg = copies.n_pos.to(dtype), copies.n_neg.to(dtype)
    per_token = copies.pos.to(dtype) * up + copies.neg.to(dtype) * down
    total = count.sum().clamp_min(1)
    loss = torch.where(m, per_token, 0.0).sum() / total
    stats = {
        k: n_pos * up_stats[k] + n_neg * down_stats[k] + (count - n_pos - n_neg) * flat_stats[k]
        for k in up_stats
    }
    if entropy is not None:
        ent = entropy.to(dtype)
        if entropy_coef != 0:
            loss = loss - entropy_coef * torch.where(m, count * ent, 0.0).sum() / total
        stats["entropy"] = count * ent
    return loss, _metrics(stats, m, count)


def _check_shapes(logprobs, old_logprobs, advantages, mask, entropy) -> None:
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs must be a 2-D tensor [B, T]; got {_shape(logprobs)}")
    if not logprobs.dtype.is_floating_point:
        raise ValueError(f"logprobs must be floating point; got {logprobs.dtype}")
    shape = tuple(logprobs.shape)
    for name, x in (("old_logprobs", old_logprobs), ("mask", mask)):
        if _shape(x) != shape:
            raise ValueError(f"{name} must have the shape of logprobs {shape}; got {_shape(x)}")
    if _shape(advantages) not in (shape, shape[:1]):
        raise ValueError(f"advantages must have shape {shape} or {shape[:1]}; got {_shape(advantages)}")
    if entropy is not None and _shape(entropy) != shape:
        raise ValueError(f"entropy must have the shape of logprobs {shape}; got {_shape(entropy)}")


def _check_params(clip_low, clip_high, dual_clip, has_entropy: bool, entropy_coef) -> None:
    if entropy_coef != 0 and not has_entropy:
        raise ValueError(f"entropy_coef is {entropy_coef} but no entropy was given")
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1); got {clip_low}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0; got {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 or None; got {dual_clip}")


def _shape(x) -> tuple[int, ...] | str:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
