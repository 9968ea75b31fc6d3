"""``Engine.generate``: complete a list of prompts, stepping all unfinished sequences together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from arpo_fast.engine.params import SamplingParams
from arpo_fast.text import StopStrings, TokenBytes


@dataclass
class Completion:
    """One prompt's new tokens with their log-probs and the sampling distribution's entropies.
    finish_reason: "eos", "stop_token", "stop_string" or "length"."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def _stop_reason(engine, params: SamplingParams, out: Completion, stops: StopStrings | None) -> str | None:
    token = out.token_ids[-1]
    if not params.ignore_eos and token in engine.eos_token_ids:
        return "eos"
    if token in params.stop_token_ids:
        return "stop_token"
    if stops is not None and stops.feed(token) is not None:
        return "stop_string"
    if len(out.token_ids) >= params.max_new_tokens:
        return "length"
    return None


def generate(
    engine, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
) -> list[Completion]:
    """Add every prompt, step the unfinished ones until each stops; frees its sequences on return
    (and on error, so a failed call leaves the pool as it found it)."""
    if params.stop and engine.tokenizer is None:
        raise ValueError("stop strings need a tokenizer: Engine(model, tokenizer=...)")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    for i, p in enumerate(prompts):  # validate all before adding any
        engine._check_tokens(p, f"generate: prompt {i}")
    seqs, outs = [], [Completion() for _ in prompts]
    # stop strings are found incrementally, token by token, on the exact text of the new tokens
    token_bytes = TokenBytes(engine.tokenizer) if params.stop else None
    stops = [StopStrings(token_bytes, params.stop) if token_bytes is not None else None for _ in prompts]
    try:
        for p, seed in zip(prompts, seeds):
            seqs.append(engine.add(p, seed))
        active = []
        # Prompts are prefilled in groups of at most max_prefill_tokens tokens (bounding the step's
        # activation memory), then every unfinished sequence decodes together.
        for group in _groups([len(p) for p in prompts], engine.config.max_prefill_tokens):
            active += _step(engine, seqs, group, outs, params, stops)
        while active:
            active = _step(engine, seqs, active, outs, params, stops)
    finally:
        for s in seqs:
            engine.free(s)
    return outs


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return groups + [current] if current else groups


def _step(
    engine,
    seqs,
    rows: list[int],
    outs: list[Completion],
    params: SamplingParams,
    stops: list[StopStrings | None],
) -> list[int]:
    """Step the sequences of ``rows``, record their tokens; returns the rows still unfinished."""
    step = engine.step([seqs[i] for i in rows], params)
    tokens, ran = step.tokens.tolist(), step.ran.tolist()
    stats = torch.stack([step.logprobs, step.entropy]).cpu().tolist()
    still = []
    for row, i in enumerate(rows):
        if ran[row]:
            out = outs[i]
            out.token_ids.append(tokens[row])
            out.logprobs.append(stats[0][row])
            out.entropies.append(stats[1][row])
            out.finish_reason = _stop_reason(engine, params, out, stops[i])
            if out.finish_reason:
                continue
        still.append(i)
    return still
