"""Prompt contexts of split trees (``packing.PromptContext``): run once, shared by the tree's groups.

A tree too big for one micro-batch is split into groups, each laying out only the prompt's last
token; the rest of the prompt is its context. For one pass of one model over a mini-batch's
micro-batches, :class:`ContextCache` runs each context through the model alone (causally, keeping
each layer's keys and values: ``attention.ContextRun``) and hands them to the micro-batches
(``attention.ContextKV``), which attend to them in front of their own row.

In the gradient pass the context runs with autograd on, once. Its micro-batches get its keys and
values as fp32 leaves, whose gradients add up over the tree's groups. In the context's own run
each layer's keys and values pass through an identity whose backward adds those sums
(``attention.ContextRun.slots``); after the last group, a backward from the run's output (with a
zero gradient there) carries them through the context, layer by layer, under activation
checkpointing too. The gradient is the one of running the prompt in every group, as the
per-trajectory update does, while the prompt goes through the model once per tree.

In one process a context runs when a micro-batch first needs it and goes back after its last
group. Under torchrun every rank must make the same module calls (FSDP2 gathers and reduces
parameters in them): :meth:`ContextCache.start` runs a mini-batch's contexts up front, as many on
every rank (short stand-ins where a rank has fewer), and :meth:`ContextCache.finish` sends them all
back at the mini-batch's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from arpo_fast.train.attention import ContextKV, ContextRun
from arpo_fast.train.batch import Batch
from arpo_fast.train.tree_batch import PromptContext


@dataclass(eq=False)
class _Run:
    """A prompt context's run: its output (None unless trainable), the keys and values handed to
    its groups (per layer), and how many of its groups are still to come."""

    output: Optional[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    groups_left: int


class ContextCache:
    """Keys and values of the prompt contexts of one pass over micro-batches (``batch.Batch``).

    ``model(context, temperature, attention, run)`` runs a ``PromptContext`` (``LogprobModel``).
    Call :meth:`kv` before a micro-batch's forward and :meth:`done` after it (after its backward
    when ``trainable``): a context goes back once each of its groups is done, or at
    :meth:`finish` after a :meth:`start`."""

    def __init__(self, model, temperature: float, attention: str, trainable: bool):
        self.model, self.temperature, self.attention = model, temperature, attention
        self.trainable = trainable
        self.live: dict[int, _Run] = {}  # by id(context)
        self.held: list[_Run] = []  # after start(): every run, stand-ins included, in order
        self.tokens = 0  # context tokens run through the model

    def start(self, plan: list[Batch], runs: int, pad_id: int) -> None:
        """Run the contexts of ``plan`` (a mini-batch's micro-batches) now, then stand-ins of one
        ``pad_id`` token up to ``runs`` in all; they go back at :meth:`finish`."""
        contexts = {id(c): c for batch in plan for c in batch.contexts}
        for context in contexts.values():
            self.live[id(context)] = self._run(context)
            self.held.append(self.live[id(context)])
        for _ in range(runs - len(contexts)):  # stand-ins count for nothing, as stand-in micro-batches
            self.held.append(self._run(PromptContext(torch.full((1,), pad_id, dtype=torch.int64), 0)))
            self.tokens -= 1

    def kv(self, batch: Batch) -> Optional[ContextKV]:
        """The keys and values ``batch``'s rows attend to in front of their own (None: no contexts)."""
        if not batch.contexts:
            return None
        for context in batch.contexts:
            if id(context) not in self.live:
                self.live[id(context)] = self._run(context)
        runs = [self.live[id(c)] for c in batch.contexts]
        layers = range(len(runs[0].keys))
        return ContextKV(
            [torch.cat([r.keys[i] for r in runs], dim=2) for i in layers],
            [torch.cat([r.values[i] for r in runs], dim=2) for i in layers],
        )

    def _run(self, context: PromptContext) -> _Run:
        trainable = self.trainable and torch.is_grad_enabled()
        run = ContextRun(inject=trainable)
        with torch.set_grad_enabled(trainable):
            output = self.model(context, self.temperature, self.attention, run)
        self.tokens += context.tokens
        layers = sorted(run.keys)
        keys, values = [run.keys[i] for i in layers], [run.values[i] for i in layers]
        if trainable:  # leaves whose gradients add up over the groups, read back by the run's slots
            assert run.slots is not None, "ContextRun(inject=True) has slots"
            keys = [k.detach().float().requires_grad_() for k in keys]
            values = [v.detach().float().requires_grad_() for v in values]
            for i, k, v in zip(layers, keys, values):
                run.slots[i, "key"].append(k)
                run.slots[i, "value"].append(v)
        return _Run(output if trainable else None, keys, values, context.groups)

    def done(self, batch: Batch) -> None:
        """``batch`` has had its forward (and backward): a context it was the last group of goes
        back now, unless :meth:`start` ran it."""
        for context in batch.contexts:
            run = self.live[id(context)]
            run.groups_left -= 1
            if run.groups_left == 0:
                del self.live[id(context)]
                if not any(run is held for held in self.held):
                    _backward(run)

    def finish(self) -> None:
        """Send back every context :meth:`start` ran, in its order."""
        for run in self.held:
            _backward(run)
        self.held.clear()
        self.live.clear()


def _backward(run: _Run) -> None:
    """The context's gradients (its leaves' sums, added at its keys and values) back through its run."""
    if run.output is not None:
        run.output.backward(torch.zeros_like(run.output))


def context_order(plan: list[Batch]) -> list[Batch]:
    """A mini-batch's micro-batches (``TreeBatch``) with the groups of each split tree together, so
    that few prompt contexts are held at once (first-fit packing leaves them scattered)."""
    first: dict[int, int] = {}
    for k, batch in enumerate(plan):
        for c in batch.contexts:
            first.setdefault(id(c), k)
    return sorted(plan, key=lambda b: min((first[id(c)] for c in b.contexts), default=-1))
