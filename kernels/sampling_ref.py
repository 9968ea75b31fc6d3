"""The fused sampler's pure-PyTorch side: its output type, argument checks, the top-k/top-p
threshold (the second path, which the Triton path uses too) and the reference ``sample_ref``."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._dispatch import vocab_in_use
from .counter_rng import uniform53_ref

TensorOrFloat = torch.Tensor | float
TensorOrInt = torch.Tensor | int


class SampleOutput(NamedTuple):
    """What ``sample`` returns; every field has shape [B].

    tokens:   int64, the sampled token (-1 where ``valid`` is False).
    logprobs: float32, log-prob of the token under the distribution sampled from (tempered, and
              truncated and renormalised when top-k/top-p is set); NaN where ``valid`` is False.
    entropy:  float32, entropy in nats of that same distribution; NaN where ``valid`` is False.
    valid:    bool, False for rows with a NaN or +inf entry, or with every entry -inf.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    valid: torch.Tensor


def check_args(logits: torch.Tensor, **per_row) -> None:
    """Shapes and dtypes, checked without reading any device value (no host sync)."""
    _check_logits(logits)
    B = logits.shape[0]
    for name, value in per_row.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != (B,):
            raise ValueError(f"{name} must be a scalar or have shape [{B}], got {tuple(value.shape)}")
    if isinstance(per_row.get("temperature"), float) and math.isnan(per_row["temperature"]):
        raise ValueError("temperature is NaN")


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one vocabulary entry")


def within_vocab(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """The first ``vocab_limit`` columns of logits [B, V] as a view (no copy, no pass over the
    data): ids at and past the limit are then never sampled, and log-prob and entropy are those of
    the distribution over the ids below it. None, or a limit >= V, keeps every column."""
    V = logits.shape[1]
    limit = vocab_in_use(V, vocab_limit)
    return logits[:, :limit] if limit < V else logits


def raise_if_invalid(out: SampleOutput) -> None:
    """Host sync: only with check=True."""
    bad = (~out.valid).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else "")
        raise ValueError(
            f"sample: {len(bad)} row(s) of logits have a NaN or +inf entry or are entirely -inf: rows {shown}"
        )


def row_values(value, B: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-row tensor [B] of dtype from a scalar or a [B] (or 0-d) tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(B)
    return torch.full((B,), value, dtype=dtype, device=device)


def seed_int64(seed):
    """Python int seeds wrap into int64, as int64 seed tensors hold them."""
    if isinstance(seed, torch.Tensor):
        return seed
    return (int(seed) + 2**63) % 2**64 - 2**63


def active_truncation(top_k, top_p, V: int):
    """(top_k, top_p) as the kernels take them: None for a number that keeps every entry (k <= 0,
    k >= V, p >= 1, or None), so the off values 0 and 1.0 take the one-pass path and sort
    nothing. Per-row tensors are kept as they are (a row's k <= 0 or p >= 1 is off there)."""
    if top_k is not None and not isinstance(top_k, torch.Tensor) and not 0 < top_k < V:
        top_k = None
    if top_p is not None and not isinstance(top_p, torch.Tensor) and top_p >= 1:
        top_p = None
    return top_k, top_p


def truncation_candidates(logits: torch.Tensor, top_k) -> torch.Tensor:
    """Each row's entries that top-k/top-p can keep, sorted descending, in the logits' dtype:
    the top k for one k shared by all rows, else the whole row. [B, n]."""
    # Selection and sorting run on the logits' own dtype (half the bytes of fp32 for bf16, and no
    # fp32 copy of the whole row).
    if top_k is not None and not isinstance(top_k, torch.Tensor) and 0 < top_k < logits.shape[1]:
        # One k for all rows: top-k candidates suffice, far cheaper than a full sort.
        return torch.topk(logits, int(top_k), dim=1, sorted=True).values
    return torch.sort(logits, dim=1, descending=True).values


def truncation_threshold(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """Per-row logit threshold for top-k then top-p: entries below it are dropped.

    logits: [B, V] any float dtype. temperature: float or [B] (<= 0: greedy, judged at T = 1).
    top_k: None, int or int [B] (None, <= 0 or >= V: off). top_p: None, float or [B] (None or
    >= 1: off).
    Returns fp32 [B]. Ties at the threshold are all kept. No host syncs.
    """
    B, V = logits.shape
    dev = logits.device
    cand = truncation_candidates(logits, top_k).float()  # converted exactly
    n = cand.shape[1]
    neg_inf = torch.full((B,), float("-inf"), device=dev)
    lo = neg_inf
    if top_k is not None:
        k = row_values(top_k, B, torch.int64, dev)
        kth = cand.gather(1, (k.clamp(1, n) - 1)[:, None])[:, 0]
        lo = torch.where((k > 0) & (k < V), kth, neg_inf)
    if top_p is not None:
        p = row_values(top_p, B, torch.float32, dev)
        t = row_values(temperature, B, torch.float32, dev)
        t = torch.where(t > 0, t, torch.ones_like(t))
        top = cand[:, :1]
        z = torch.where(cand < lo[:, None], float("-inf"), (cand - top) / t[:, None])
        # fp32 exponentials, float64 sums: the mass strictly above each entry against p * S.
        e = torch.exp(z).double()
        before = torch.cumsum(e, dim=1) - e
        n_keep = (before < p[:, None].double() * e.sum(1, keepdim=True)).sum(1).clamp(1, n)
        lo_p = cand.gather(1, (n_keep - 1)[:, None])[:, 0]
        lo = torch.where(p < 1, torch.maximum(lo, lo_p), lo)
    return lo.contiguous()


def _inverse_cdf_ref(mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative mass exceeds u * total: mass fp32 [B, V] (>= 0), u fp64 [B].
    Returns int64 [B]; never an index of zero mass (when rounding puts u * total at the very end,
    the last entry with mass)."""
    cum = torch.cumsum(mass.double(), dim=1)
    tok = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
    last = torch.searchsorted(cum, cum[:, -1:].contiguous(), right=False)[:, 0]
    return torch.minimum(tok, last)


def sample_ref(
    logits: torch.Tensor,
    temperature: TensorOrFloat = 1.0,
    seed: TensorOrInt = 0,
    position: torch.Tensor | None = None,
    top_k: TensorOrInt | None = 0,
    top_p: TensorOrFloat | None = 1.0,
    *,
    vocab_limit: int | None = None,
    check: bool = False,
) -> SampleOutput:
    """Pure-PyTorch reference of ``sample``: same signature, same rule, same uniforms.

    In fp32 like the kernel: z = (x - max) / T, S = sum exp(z), log-prob = z_tok - log S and
    entropy = log S - sum exp(z) z / S. The token is the inverse CDF of the same 53-bit uniform over
    the fp32 masses accumulated in float64, so it equals the kernel's token except where the
    uniform lands within float rounding of a token boundary. This is also what ``sample`` runs on
    CPU tensors.
    """
    check_args(logits, temperature=temperature, seed=seed, position=position, top_k=top_k, top_p=top_p)
    logits = within_vocab(logits, vocab_limit)
    B, V = logits.shape
    dev = logits.device
    top_k, top_p = active_truncation(top_k, top_p, V)
    x = logits.float()
    if top_k is not None or top_p is not None:
        lo = truncation_threshold(logits, temperature, top_k, top_p)
        x = torch.where(x < lo[:, None], float("-inf"), x)
    t = row_values(temperature, B, torch.float32, dev)
    greedy = t <= 0
    t = torch.where(greedy, torch.ones_like(t), t)
    big_m = x.max(dim=1, keepdim=True).values
    z = (x - torch.where(big_m == float("-inf"), 0.0, big_m)) / t[:, None]
    mass = torch.exp(z)
    total = mass.sum(1)
    log_total = torch.log(total)
    # where(): 0 * -inf is NaN for masked entries; their contribution is 0.
    entropy = log_total - torch.where(mass > 0, mass * z, 0.0).sum(1) / total
    valid = (total > 0) & (total < float("inf"))  # False for NaN and +inf rows too

    u = uniform53_ref(
        row_values(seed_int64(seed), B, torch.int64, dev),
        row_values(0 if position is None else position, B, torch.int64, dev),
    )
    tok = torch.where(greedy, torch.argmax(x, dim=1), _inverse_cdf_ref(mass, u))
    tok = torch.where(valid, tok, -1)
    logp = z.gather(1, tok.clamp(0, V - 1)[:, None])[:, 0] - log_total
    nan = torch.full_like(logp, float("nan"))
    out = SampleOutput(tok, torch.where(valid, logp, nan), torch.where(valid, entropy, nan), valid)
    if check:
        raise_if_invalid(out)
    return out
