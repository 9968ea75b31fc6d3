"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

A decode step of a small model is a thousand tiny kernel launches; on a GPU the launches, not the
math, set its time. Each graph holds one whole decode step (forward of one token per sequence and
the fused sampler) over static input buffers; a step copies its inputs into them and replays.

Padding rows read and write a reserved "trash" block (block 0 of the pool, held by the engine for
the cache's lifetime), so they never touch a real sequence's KV. Graphs see the model's parameters
and the KV pool by address: in-place optimizer steps are picked up; when the pool is released and
taken back (``Engine.release``/``reacquire``) or a weight's storage is rebuilt, the graphs are
captured again if anything moved (``drop_if_moved``); replacing a parameter tensor object is not
picked up (rebuild the engine then). Only plain sampling (no top-k/top-p) is captured; other
steps run eagerly.

This path needs CUDA and is on by default for CUDA models (``EngineConfig.cuda_graphs``); the eager
path is the one the CPU test suite checks, and a GPU test compares the two.
"""

from __future__ import annotations

import torch

from arpo_fast.engine.model import Batch
from arpo_fast.kernels import SampleOutput, sample

TRASH_BLOCK = 0


def batch_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class DecodeGraphs:
    """Captured decode steps for batch sizes up to ``max_batch`` and block tables up to ``max_width``."""

    def __init__(self, model, cache, max_batch: int, max_width: int, vocab_limit: int | None = None):
        dev = cache.device
        self.model, self.cache, self.vocab_limit = model, cache, vocab_limit
        self.max_batch, self.max_width = max_batch, max_width
        M = max_batch
        self.ids = torch.zeros(M, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(M, dtype=torch.int64, device=dev)
        self.slots = torch.full((M,), TRASH_BLOCK * cache.block_size, dtype=torch.int64, device=dev)
        self.tables = torch.full((M, max_width), TRASH_BLOCK, dtype=torch.int32, device=dev)
        self.lens = torch.ones(M, dtype=torch.int32, device=dev)
        self.cu = torch.arange(M + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(M, dtype=torch.int64, device=dev)
        self.temp = torch.ones(M, dtype=torch.float32, device=dev)
        self.seed = torch.zeros(M, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(M, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, SampleOutput, torch.Tensor]] = {}
        self.captured_at: tuple[int, ...] = ()
        self.captures = 0
        self.sizes = batch_sizes(max_batch)
        self.replays = 0

    def _step(self, bs: int) -> tuple[SampleOutput, torch.Tensor]:
        batch = Batch(
            self.ids[:bs],
            self.positions[:bs],
            self.slots[:bs],
            self.tables[:bs],
            self.lens[:bs],
            self.cu[: bs + 1],
            self.rows[:bs],
            1,
        )
        logits = self.model.forward(self.cache, batch)
        out = sample(logits, self.temp[:bs], self.seed[:bs], self.pos[:bs], vocab_limit=self.vocab_limit)
        return out, logits

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every batch size, largest first, sharing one memory pool."""
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm every size: Triton compiles and autotunes per launch configuration (split or
            # not depends on the batch size), and neither may happen during a capture.
            for bs in self.sizes:
                self._step(bs)
        torch.cuda.current_stream().wait_stream(stream)
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out, logits = self._step(bs)
            pool = graph.pool()
            self.graphs[bs] = (graph, out, logits)
        torch.cuda.synchronize()
        self.captured_at = self.addresses()
        self.captures += 1

    def addresses(self) -> tuple[int, ...]:
        """Where the KV pool and every weight live: a graph reads them there."""
        return (self.cache.kv.data_ptr(), *(p.data_ptr() for p in self.model.hf.parameters()))

    def drop_if_moved(self) -> bool:
        """Drop the captured graphs if the pool or a weight has moved since their capture (a pool
        released and taken back, a weight copy rebuilt); the next plain decode step captures them
        again. Returns whether they were dropped."""
        if not self.graphs or self.addresses() == self.captured_at:
            return False
        self.graphs = {}
        return True

    def fits(self, B: int, width: int) -> bool:
        return 0 < B <= self.max_batch and width <= self.max_width

    def run(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        step,
        temp: torch.Tensor,
        seed: torch.Tensor,
        sample_pos: torch.Tensor,
    ):
        """Replay the graph of the smallest captured size >= B. tokens, positions (of the pending
        tokens), temp, seed, sample_pos (the sampler's positions): [B] on the device; ``step``: the
        cache's StepTensors for these B sequences (one token each). Returns the sampler's output
        for the B rows (copied out of the static buffers) and the step's logits [B, V] (a view of
        the graph's buffer: valid until the next replay)."""
        B, W = step.block_tables.shape
        bs = next(s for s in self.sizes if s >= B)
        self.ids[:B].copy_(tokens)
        self.positions[:B].copy_(positions)
        self.pos[:B].copy_(sample_pos)
        self.slots[:B].copy_(step.slot_mapping)
        self.tables[:B, :W].copy_(step.block_tables)
        self.lens[:B].copy_(step.context_lens)
        self.temp[:B].copy_(temp)
        self.seed[:B].copy_(seed)
        if bs > B:  # padding rows: one token at the trash slot
            self.slots[B:bs].fill_(TRASH_BLOCK * self.cache.block_size)
            self.tables[B:bs, 0] = TRASH_BLOCK
            self.lens[B:bs] = 1
        graph, out, logits = self.graphs[bs]
        graph.replay()
        self.replays += 1
        return type(out)(*(t[:B].clone() for t in out)), logits[:B]
