"""Prompt contexts of split trees (``packing.PromptContext``): run once, shared by the tree's groups.

A tree too big for one micro-batch is split into groups, each laying out only the prompt's last
token; the rest of the prompt is its context. For one pass of one model over a mini-batch's
micro-batches, :class:`ContextCache` runs each context through the model alone (causally, keeping
each layer's keys and values: ``attention.ContextRun``) the first time a micro-batch needs it, and
hands them to the micro-batches (``attention.ContextKV``), which attend to them in front of their
own row.

In the gradient pass the context runs with autograd on, once. Its micro-batches get its keys and
values as fp32 leaves, whose gradients add up over the tree's groups; after the last group's
backward, those sums go back through the context's one run (``torch.autograd.backward`` from the
kept keys and values; under activation checkpointing the layers recompute what it needs). The
gradient is the one of running the prompt in every group, as the per-trajectory update does, while
the prompt goes through the model once per tree.
"""

from __future__ import annotations

from typing import Optional

import torch

from arpo_fast.train.attention import ContextKV, ContextRun


class ContextCache:
    """Keys and values of the prompt contexts of one pass over micro-batches (``TreeBatch``).

    ``model(context, temperature, attention, run)`` runs a ``PromptContext`` (``LogprobModel``).
    Call :meth:`kv` before a micro-batch's forward and :meth:`done` after it (after its backward
    when ``trainable``): a context is dropped once each of its groups is done."""

    def __init__(self, model, temperature: float, attention: str, trainable: bool):
        self.model, self.temperature, self.attention = model, temperature, attention
        self.trainable = trainable
        self.live: dict[int, list] = {}   # id(context) -> [its run's keys + values, keys given,
                                          # values given, groups left]
        self.tokens = 0                   # context tokens run through the model

    def kv(self, batch) -> Optional[ContextKV]:
        """The keys and values ``batch``'s rows attend to in front of their own (None: no contexts)."""
        contexts = getattr(batch, "contexts", None)
        if not contexts:
            return None
        for context in contexts:
            if id(context) not in self.live:
                self.live[id(context)] = self._run(context)
        entries = [self.live[id(c)] for c in contexts]
        layers = range(len(entries[0][1]))
        return ContextKV([torch.cat([e[1][i] for e in entries], dim=2) for i in layers],
                         [torch.cat([e[2][i] for e in entries], dim=2) for i in layers])

    def _run(self, context) -> list:
        run = ContextRun()
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            self.model(context, self.temperature, self.attention, run)
        self.tokens += context.tokens
        layers = sorted(run.keys)
        kept = [run.keys[i] for i in layers] + [run.values[i] for i in layers]
        given = kept
        if kept and kept[0].requires_grad:  # leaves whose gradients add up over the groups
            given = [t.detach().float().requires_grad_() for t in kept]
        return [kept, given[:len(layers)], given[len(layers):], context.groups]

    def done(self, batch) -> None:
        """``batch`` has had its forward (and backward): drop the contexts it was the last group
        of, after sending their keys' and values' gradients back through their run."""
        for context in getattr(batch, "contexts", None) or []:
            entry = self.live[id(context)]
            entry[3] -= 1
            if entry[3] == 0:
                del self.live[id(context)]
                kept, leaves = entry[0], entry[1] + entry[2]
                pairs = [(k, leaf.grad) for k, leaf in zip(kept, leaves) if leaf.grad is not None]
                if pairs:
                    torch.autograd.backward([k for k, _ in pairs], [g.to(k.dtype) for k, g in pairs])


def context_order(plan: list) -> list:
    """A mini-batch's micro-batches (``TreeBatch``) with the groups of each split tree together, so
    that few prompt contexts are held at once (first-fit packing leaves them scattered)."""
    first: dict[int, int] = {}
    for k, batch in enumerate(plan):
        for c in batch.contexts:
            first.setdefault(id(c), k)
    return sorted(plan, key=lambda b: min((first[id(c)] for c in b.contexts), default=-1))
