"""The update's settings (``UpdateConfig``) and what they resolve to on a device: which attention
implementation runs, and whether activations are checkpointed. No torch here, so that the trainer's
config can hold these settings without importing the update."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

from arpo_fast.settings import require_counts, require_non_negative, setting

IMPLEMENTATIONS = ("auto", "sdpa", "flex_attention", "flash_attention_2")
CHECKPOINTING = ("auto", "true", "false")
LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dynamic-bsz")
"""``algo.aggregation.LOSS_AGG``, named here so that the config needs no torch."""
OLD_LOGPROBS = ("recompute", "rollout")


@dataclass(frozen=True)
class UpdateConfig:
    """The clipped update. Defaults are the reference's (clip 0.2/0.2, dual clip 3, no entropy
    bonus, gradient norm 1, mini-batches of 16 prompts, one pass over the data); where it differs:
    ``micro_batch_tokens`` (its scripts batch by tokens too, dynamically, at 2 x (prompt + response
    length) per GPU: 11,264 in the 7B reasoning run; here 16,384 by default, a packed row holding
    about 1.6x the trajectories of a padded one), and ``rollout_is_cap`` is off (the reference has
    no such correction)."""

    clip_low: float = setting(0.2, "A token's ratio counts down to 1 - clip_low.")
    clip_high: float = setting(0.2, "A token's ratio counts up to 1 + clip_high.")
    dual_clip: float = setting(
        3.0, "Bound on the loss of a negative-advantage token, in units of |A| (0: no dual clip)."
    )
    entropy_coef: float = setting(0.0, "Weight of the entropy bonus (the reference: 0).")
    grad_clip: float = setting(1.0, "Clip the gradient's global norm to this (0: no clipping).")
    mini_batch_prompts: Optional[int] = setting(
        16,
        "Prompts per optimizer step; a step of --prompts-per-step prompts takes ceil(prompts / "
        "this) steps (auto: the reference's 16, or 2 with --model demo: 4 steps of its 8 prompts).",
    )
    micro_batch_tokens: int = setting(
        16384,
        "Most tokens in one forward/backward of the update (packed: "
        "the row, a split tree's shared branches included, its prompt "
        "run once apart; per trajectory: padded).",
    )
    loss_agg: Optional[str] = setting(
        "token-mean",
        "How a mini-batch's token losses add up (verl's names): token-mean (every model-written "
        "token weighs the same), seq-mean-token-mean, seq-mean-token-sum, or dynamic-bsz (the "
        "reference's: each micro-batch's token-mean weighted by its share of the sequences; "
        "see docs/training.md). Auto: token-mean, or dynamic-bsz with --arpo-semantics reference.",
    )
    """None (``auto``) only inside the trainer's config, which resolves it per job."""
    kl_coef: float = setting(
        0.0,
        "Weight of the KL penalty to a frozen copy of the starting policy (k3 "
        "estimator on model-written tokens); 0, the reference implementation's "
        "value, holds no such copy.",
    )
    rollout_is_cap: float = setting(
        0.0,
        "Weight each token's loss by min(exp(old - rollout log-prob), "
        "this): truncated importance sampling for the rollout/trainer "
        "mismatch (0: off).",
    )
    old_logprobs: str = setting(
        "recompute",
        "The ratio's old policy: recompute (the trainer's log-probs of the rollout policy, a "
        "forward pass over the mini-batches after the first; the reference) or rollout (the "
        "sampler's own log-probs, stored with the rollout: no extra pass).",
    )
    packed_update: bool = setting(
        True,
        "Lay each prompt's rollout tree out once, so shared tokens go "
        "through the model once (false: every trajectory from its first "
        "token, right-padded; the same loss).",
    )
    attn_implementation: str = setting(
        "auto",
        "Attention of the update: auto (packed: flex_attention on "
        "CUDA, sdpa on the CPU; per trajectory: flash_attention_2 when "
        "flash-attn is installed, else sdpa), sdpa, flex_attention or "
        "flash_attention_2 (per trajectory only).",
    )
    gradient_checkpointing: str = setting(
        "auto",
        "Recompute each decoder layer in backward instead of "
        "keeping its activations: auto (on CUDA, off on the CPU), "
        "true or false.",
    )

    def __post_init__(self):
        require_non_negative(
            self,
            "clip_low",
            "clip_high",
            "entropy_coef",
            "grad_clip",
            "dual_clip",
            "rollout_is_cap",
            "kl_coef",
        )
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1, got {self.clip_low}")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or 0 for off), got {self.dual_clip}")
        require_counts(self, "micro_batch_tokens")
        if self.mini_batch_prompts is not None:  # None: auto, which the trainer's config resolves
            require_counts(self, "mini_batch_prompts")
        if self.attn_implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {', '.join(IMPLEMENTATIONS)}, got "
                f"{self.attn_implementation!r}"
            )
        resolve_checkpointing(self.gradient_checkpointing, "cpu")  # checks the value
        if self.loss_agg is not None and self.loss_agg not in LOSS_AGG:
            raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGG)}, got {self.loss_agg!r}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"old_logprobs must be recompute or rollout, got {self.old_logprobs!r}")
        if self.old_logprobs == "rollout" and self.rollout_is_cap:
            raise ValueError(
                "rollout_is_cap weights recomputed old log-probs toward the rollout's; with "
                "old_logprobs rollout the ratio is already against the rollout's: set one of them"
            )

    def resolved(self, device) -> tuple[str, bool]:
        """(attention implementation, activation checkpointing) on ``device``."""
        return (
            resolve_attention(self.attn_implementation, self.packed_update, device),
            resolve_checkpointing(self.gradient_checkpointing, device),
        )

    def describe(self, device) -> str:
        attention, checkpointing = self.resolved(device)
        layout = "tree-packed" if self.packed_update else "per-trajectory"
        return (
            f"{layout} update, attention {attention}, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}"
        )


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(name: str, packed: bool, device) -> str:
    """The attention implementation ``name`` (one of ``IMPLEMENTATIONS``) stands for on ``device``."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    cuda = _is_cuda(device)
    if name == "auto":
        if packed:
            return "flex_attention" if cuda else "sdpa"
        return "flash_attention_2" if cuda and flash_attn_installed() else "sdpa"
    if name == "flash_attention_2":
        if packed:
            raise ValueError(
                "attn_implementation flash_attention_2 runs independent sequences only and "
                "cannot express a tree's mask: use flex_attention or sdpa, or "
                "--packed-update false"
            )
        if not (cuda and flash_attn_installed()):
            raise ValueError("attn_implementation flash_attention_2 needs CUDA and the flash-attn package")
    return name


def resolve_checkpointing(name: str, device) -> bool:
    """``auto``: on for CUDA (as in the reference's scripts), off on the CPU."""
    if name not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing must be auto, true or false, got {name!r}")
    return _is_cuda(device) if name == "auto" else name == "true"


def _is_cuda(device) -> bool:
    """Whether ``device`` (a ``torch.device`` or its name, such as ``"cuda:1"``) is a CUDA device."""
    return (getattr(device, "type", None) or str(device).split(":")[0]) == "cuda"
