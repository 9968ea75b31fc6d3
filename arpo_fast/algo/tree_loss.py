"""The clipped loss of tokens shared by several trajectories, computed once per token.

A token on a shared prefix has one log-prob, hence one ratio r, for all of its copies. With
A+ = max(A, 0) and A- = max(-A, 0), the per-copy clipped losses of :func:`policy_loss` add up to

    -(sum of A+) * min(r, 1 + clip_high) + (sum of A-) * min(max(r, 1 - clip_low), dual_clip)

(without dual clip the second factor is max(r, 1 - clip_low)): for A > 0 the larger of -A r and
-A clamp(r) is -A min(r, 1 + clip_high), for A < 0 it is |A| max(r, 1 - clip_low), capped at
|A| dual_clip. So the loss, its gradient and every metric of the per-copy computation come out of
each token's copy count and the sums and counts of its positive and negative advantages. The
token-mean still counts every copy. Hard attribution (one advantage for every copy) is the case
where all copies agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arpo_fast.algo.loss import MAX_LOG_RATIO, _check_params


@dataclass
class CopyAdvantages:
    """Per token (each [n], fp32): what its copies bring to the loss. ``count`` is also the token's
    weight in every token-mean (loss, entropy, metrics; a KL term would use it too)."""

    pos: torch.Tensor      # sum over copies of max(A, 0)
    neg: torch.Tensor      # sum over copies of max(-A, 0)
    n_pos: torch.Tensor    # copies with A > 0
    n_neg: torch.Tensor    # copies with A < 0
    count: torch.Tensor    # copies

    @classmethod
    def of(cls, adv: torch.Tensor) -> CopyAdvantages:
        """From the advantages of every copy: [copies, n]."""
        adv = adv.float()
        return cls(adv.clamp(min=0).sum(0), (-adv).clamp(min=0).sum(0), (adv > 0).sum(0).float(),
                   (adv < 0).sum(0).float(), torch.full((adv.shape[1],), float(adv.shape[0])))

    @classmethod
    def cat(cls, parts: list[CopyAdvantages]) -> CopyAdvantages:
        if not parts:
            return cls(*(torch.zeros(0) for _ in range(5)))
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in cls._names()))

    @staticmethod
    def _names() -> tuple[str, ...]:
        return ("pos", "neg", "n_pos", "n_neg", "count")

    def select(self, index: torch.Tensor) -> CopyAdvantages:
        return CopyAdvantages(*(getattr(self, name)[index] for name in self._names()))

    def scaled(self, weight: torch.Tensor) -> CopyAdvantages:
        """Every copy's advantage times ``weight`` (>= 0, per token): the sums scale, counts stay."""
        return CopyAdvantages(self.pos * weight, self.neg * weight, self.n_pos, self.n_neg, self.count)

    def to(self, device) -> CopyAdvantages:
        return CopyAdvantages(*(getattr(self, name).to(device) for name in self._names()))


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
    """:func:`policy_loss` of every copy of each token, each token computed once.

    Args:
        logprobs: [n] float, the current policy's log-prob of each token (the gradient flows into it).
        old_logprobs: [n] float, the rollout policy's (treated as constant).
        copies: per token, its copies' advantage sums and counts (module docstring); a token with
            ``count`` 0 takes no part.
        clip_low, clip_high, dual_clip, entropy ([n]), entropy_coef: as in :func:`policy_loss`.

    Returns:
        ``(loss, metrics)`` equal to ``policy_loss`` over all copies: the loss is the sum over copies
        divided by their number; the metrics (``clip_fraction``, ``dual_clip_fraction``,
        ``approx_kl``, ``approx_kl_k3``, ``ratio_mean``, ``entropy`` and ``tokens``, the copy count)
        are means over copies.
    """
    if logprobs.dim() != 1 or old_logprobs.shape != logprobs.shape:
        raise ValueError(f"logprobs and old_logprobs must be [n]; got {tuple(logprobs.shape)} and "
                         f"{tuple(old_logprobs.shape)}")
    _check_params(clip_low, clip_high, dual_clip, entropy is not None, entropy_coef)
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    count = copies.count.to(dtype)
    m = count > 0
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zero)
    log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - clip_low, 1.0 + clip_high
    held = torch.maximum(ratio, torch.full_like(ratio, low))
    if dual_clip is not None:
        held = torch.minimum(held, torch.full_like(ratio, dual_clip))
    per_token = -copies.pos.to(dtype) * torch.minimum(ratio, torch.full_like(ratio, high)) \
        + copies.neg.to(dtype) * held
    total = count.sum().clamp_min(1)
    loss = per_token.sum() / total

    n_pos, n_neg = copies.n_pos.to(dtype), copies.n_neg.to(dtype)
    sums = {  # per token, summed over its copies
        "clip_fraction": n_pos * (ratio > high) + n_neg * (ratio < low),
        "dual_clip_fraction": n_neg * (ratio > dual_clip) if dual_clip is not None else zero * ratio,
        "approx_kl": -log_ratio * count,
        "approx_kl_k3": (ratio - 1.0 - log_ratio) * count,
        "ratio_mean": ratio * count,
    }
    if entropy is not None:
        ent = entropy.to(dtype)
        if entropy_coef != 0:
            loss = loss - entropy_coef * (count * ent).sum() / total
        sums["entropy"] = ent * count
    return loss, _copy_means(sums, m, count)


def _copy_means(sums: dict[str, torch.Tensor], m: torch.Tensor, count: torch.Tensor) -> dict[str, float]:
    """Each statistic's mean over copies, fetched from the device in one transfer."""
    with torch.no_grad():
        total = count.to(torch.float64).sum()
        means = [torch.where(m, v.detach().to(torch.float64), 0.0).sum() / total.clamp_min(1)
                 for v in sums.values()]
        values = torch.stack([*means, total]).tolist()
    return dict(zip([*sums, "tokens"], values))
