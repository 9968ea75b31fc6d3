"""The pure-PyTorch side of ``logprob_entropy``: its argument checks and the reference
``logprob_entropy_ref``, which holds the whole [T, V] logits (the tests' exact reference, in
float64)."""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import vocab_in_use

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_inputs(hidden, weight, targets, temperature, dtypes) -> None:
    """Shapes, dtypes (hidden and weight share one of ``dtypes``), devices and temperature."""
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [..., H] and weight [V, H]; got hidden {tuple(hidden.shape)}"
            f" and weight {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)} but weight is "
            f"{tuple(weight.shape)} (expected weight [V, {hidden.shape[-1]}])"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its "
            f"last dim), got {tuple(targets.shape)}"
        )
    if hidden.dtype not in dtypes or weight.dtype != hidden.dtype:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"hidden and weight must share one dtype among {names}; got hidden "
            f"{hidden.dtype} and weight {weight.dtype} (cast one, e.g. "
            f"weight.to(hidden.dtype), outside the call so autograd sees the cast)"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32) token ids, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"hidden, weight and targets must be on one device; got {hidden.device}, "
            f"{weight.device} and {targets.device}"
        )
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError naming the first target outside [0, vocab) that is not ``ignore_index``."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        pos = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"target {int(targets.flatten()[pos])} at flat position {pos} is outside "
            f"the vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})"
        )


def logprob_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    check_targets: Optional[bool] = None,
    vocab_limit: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch computation: full [T, V] logits, fp32 log_softmax, gather, entropy.

    Same arguments and results as ``logprob_entropy`` (``chunk_size`` is accepted and ignored);
    also takes fp64 inputs, which then stay fp64 throughout (the test suite's exact reference).
    """
    check_inputs(hidden, weight, targets, temperature, SUPPORTED_DTYPES + (torch.float64,))
    vocab = vocab_in_use(weight.shape[0], vocab_limit)
    if check_targets is None or check_targets:
        check_target_range(targets, vocab, ignore_index)
    logits = hidden @ weight[:vocab].t()  # rows past vocab_limit: not in the distribution
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero)
