"""One step's compute: the model's forward over the running sequences' pending tokens, then the fused
sampler (a plain decode step replays a CUDA graph when they are enabled), and the step's output
put back in the order of the sequences asked for."""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

from arpo_fast.engine.kv_cache import PagedKVCache
from arpo_fast.engine.model import PagedModel
from arpo_fast.engine.params import SamplingParams
from arpo_fast.engine.sequence import SeqState, build_batch
from arpo_fast.kernels import sample

TOP_ENTROPY_K = 10
"""How many of a distribution's most likely tokens the reference's entropy estimate covers."""


class StepOutput(NamedTuple):
    """Per input sequence, in order. tokens: int64 [B] (CPU); logprobs, entropy: fp32 [B] on the
    model's device; ran: bool [B] (CPU), False where preemption deferred the sequence to a later
    step (its token is -1 and its log-prob and entropy NaN). top_entropy: fp32 [B] on the model's
    device when asked for (``step(..., top_entropy=...)``), else None."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    ran: torch.Tensor
    top_entropy: Optional[torch.Tensor] = None


class StepRunner:
    """Runs a step of the engine's model over its paged KV ``cache``; ``graphs``: the captured
    decode steps (``cuda_graphs.DecodeGraphs``), or None; ``vocab_limit``: ids from there on are
    never sampled and count in no log-prob or entropy (None: every row of the output layer)."""

    def __init__(self, model: PagedModel, cache: PagedKVCache, graphs=None, vocab_limit: int | None = None):
        self.model, self.cache, self.graphs, self.vocab_limit = model, cache, graphs, vocab_limit

    def run(self, running: list[SeqState], meta, params: list[SamplingParams], wanted: list[int] | None):
        """Forward and sample, and the top-10 entropy of the ``wanted`` running rows."""
        dev = self.model.device
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(dev)
        seeds = torch.tensor([s.seed for s in running], dtype=torch.int64).to(dev)
        positions = torch.tensor([len(s.tokens) for s in running], dtype=torch.int64).to(dev)
        if self._graph_eligible(running, meta, params):
            tokens = torch.tensor([s.tokens[-1] for s in running], dtype=torch.int64).to(dev)
            out, logits = self.graphs.run(tokens, positions - 1, meta, temp, seeds, positions)
        else:
            batch = build_batch(running, meta, dev, all_positions=False)
            logits = self.model.forward(self.cache, batch)
            out = sample_rows(logits, params, temp, seeds, positions, self.vocab_limit)
        if wanted is None:
            return out, None
        return out, top_entropy(logits[:, : self.vocab_limit], temp, wanted, out.tokens)

    def _graph_eligible(self, running, meta, params) -> bool:
        if self.graphs is None or not self.graphs.fits(len(running), meta.block_tables.shape[1]):
            return False
        if any(s.pending != 1 for s in running):
            return False
        if any(_truncates(p) for p in params):
            return False
        if not self.graphs.graphs:
            try:
                self.graphs.capture()
            except Exception as exc:  # noqa: BLE001 - a failed capture costs speed, never the rollout
                warnings.warn(f"CUDA graph capture failed ({exc!r}); decoding eagerly", stacklevel=2)
                self.graphs = None
                return False
        return True


def _truncates(p: SamplingParams) -> bool:
    """Whether a sequence's top-k/top-p can drop tokens (top_k 0 and top_p 1.0 keep them all)."""
    return p.top_k > 0 or p.top_p < 1


def _sampler_arg(values: list, off, dtype: torch.dtype, device: torch.device):
    """One top-k or top-p setting of every row as ``sample`` takes it: None when every row has it
    off (the one-pass path), the number when all rows share it (top-k then selects k candidates
    per row instead of sorting whole rows), else a per-row tensor [B]."""
    if all(v == off for v in values):
        return None
    if len(set(values)) == 1:
        return values[0]
    return torch.tensor(values, dtype=dtype).to(device)


def sample_rows(logits, params: list[SamplingParams], temp, seeds, positions, vocab_limit=None):
    """The fused sampler over ``logits`` [B, V] (its first ``vocab_limit`` columns), each row with
    its own ``params``."""
    top_k = _sampler_arg([p.top_k for p in params], 0, torch.int64, logits.device)
    top_p = _sampler_arg([p.top_p for p in params], 1.0, torch.float32, logits.device)
    return sample(logits, temp, seeds, positions, top_k, top_p, vocab_limit=vocab_limit)


def scatter(B: int, rows: list[int], out, top: torch.Tensor | None) -> StepOutput:
    """The output of the running ``rows`` (positions among B sequences) as a :class:`StepOutput`
    of all B, deferred rows filled in (token -1, NaN)."""
    if len(rows) == B:
        return StepOutput(out.tokens.cpu(), out.logprobs, out.entropy, torch.ones(B, dtype=torch.bool), top)
    dev = out.logprobs.device
    idx = torch.tensor(rows, dtype=torch.int64)
    tokens = torch.full((B,), -1, dtype=torch.int64).index_copy_(0, idx, out.tokens.cpu())
    nan = torch.full((B,), float("nan"), device=dev)
    ran = torch.zeros(B, dtype=torch.bool).index_fill_(0, idx, True)
    top = None if top is None else nan.index_copy(0, idx.to(dev), top)
    return StepOutput(
        tokens,
        nan.index_copy(0, idx.to(dev), out.logprobs),
        nan.index_copy(0, idx.to(dev), out.entropy),
        ran,
        top,
    )


def rows_wanted(top_entropy, rows: list[int], B: int) -> list[int] | None:
    """Positions among the running ``rows`` whose top-k entropy was asked for (None: not asked)."""
    if top_entropy is None:
        return None
    if len(top_entropy) != B:
        raise ValueError(f"step: {len(top_entropy)} top_entropy flags for {B} sequences")
    return [r for r, i in enumerate(rows) if top_entropy[i]]


def top_entropy(
    logits: torch.Tensor, temp: torch.Tensor, wanted: list[int], tokens: torch.Tensor
) -> torch.Tensor:
    """fp32 [B]: -sum p log p over the TOP_ENTROPY_K largest probabilities of each wanted row of
    ``logits`` at its temperature (greedy rows at 1), NaN elsewhere; a row's sampled token
    (``tokens``, int64 [B]) counts as one more term when it is not among them: vLLM's log-probs of
    a step, which the reference sums, hold the top k and the sampled token (k + 1 entries when it
    is outside the top k). Only the wanted rows are read."""
    idx = torch.tensor(wanted, dtype=torch.int64, device=logits.device)
    t = temp.index_select(0, idx)
    z = logits.index_select(0, idx).float() / torch.where(t > 0, t, torch.ones_like(t))[:, None]
    logp = z - z.logsumexp(dim=1, keepdim=True)
    top, top_ids = logp.topk(min(TOP_ENTROPY_K, z.shape[1]), dim=1)
    tok = tokens.to(logits.device).index_select(0, idx)
    outside = (tok >= 0) & (top_ids != tok[:, None]).all(dim=1)
    tok_lp = logp.gather(1, tok.clamp(min=0)[:, None])[:, 0]
    h = -(top.exp() * top).sum(dim=1) - torch.where(outside, tok_lp.exp() * tok_lp, 0.0)
    out = torch.full((logits.shape[0],), float("nan"), dtype=torch.float32, device=logits.device)
    return out.index_copy_(0, idx, h)
