"""Paged KV cache: per-layer K and V block pools on any device, indexed through the forker.

The forker (native ``arpo_fast._C.KVForker`` by default, or the Python reference) does all the
integer work; this class owns the tensors and turns the forker's step plan into device tensors,
running the step's copy-on-write pairs with one batched gather/scatter over all layers and both of K
and V before the step's KV writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from arpo_fast.engine.forker_ref import PyKVForker


def make_forker(num_blocks: int, block_size: int, backend: str = "native"):
    """A forker by name: "native" (C++, the default) or "python" (the reference)."""
    if backend == "native":
        import arpo_fast

        return arpo_fast.native().KVForker(num_blocks, block_size)
    if backend == "python":
        return PyKVForker(num_blocks, block_size)
    raise ValueError(f"unknown forker backend {backend!r}; choose 'native' or 'python'")


class StepTensors(NamedTuple):
    """Device tensors for one step (see ``arpo_fast.step_metadata.StepMetadata``)."""

    slot_mapping: torch.Tensor  # int64 [N]
    block_tables: torch.Tensor  # int32 [B, W]
    context_lens: torch.Tensor  # int32 [B]


class PagedKVCache:
    """K and V for every layer in one tensor ``kv`` of shape [layers, 2, blocks, block_size, heads, dim].

    ``k(layer)`` and ``v(layer)`` are [num_blocks, block_size, kv_heads, head_dim] views.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        forker: str = "native",
    ):
        for name, value in [("num_layers", num_layers), ("kv_heads", kv_heads), ("head_dim", head_dim)]:
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.forker = make_forker(num_blocks, block_size, forker)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * kv_heads * head_dim * element

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def released(self) -> bool:
        return self.kv.untyped_storage().nbytes() == 0

    def release(self) -> None:
        """Give the pool's memory back to torch's allocator (the ``kv`` tensor stays, with no
        storage), so that other work can use it until :meth:`reacquire`. Idempotent."""
        if not self.released:
            self.kv.untyped_storage().resize_(0)

    def reacquire(self) -> None:
        """Take the pool's memory back, zeroed (a released pool's bytes are gone; zeros keep a
        masked attention read of an unwritten slot finite). Its address may differ from before."""
        if self.released:
            self.kv.untyped_storage().resize_(self.kv.numel() * self.kv.element_size())
            self.kv.zero_()

    def k(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def run_copies(self, copies: np.ndarray) -> None:
        """Copy whole blocks src -> dst (int32 [K, 2]) in every layer, for K and V, in one batched op."""
        if len(copies) == 0:
            return
        pairs = torch.from_numpy(np.ascontiguousarray(copies, dtype=np.int64)).to(self.device)
        self.kv.index_copy_(2, pairs[:, 1], self.kv.index_select(2, pairs[:, 0]))

    def prepare_step(self, seqs: Sequence[int], new_tokens: Sequence[int], min_width: int = 0) -> StepTensors:
        """Reserve slots for the step's new tokens, run pending copies, return the step's device tensors."""
        meta = self.forker.prepare_step(seqs, new_tokens, min_width)
        self.run_copies(meta.copies)
        dev = self.device
        return StepTensors(
            torch.from_numpy(meta.slot_mapping).to(dev, non_blocking=True),
            torch.from_numpy(meta.block_tables).to(dev, non_blocking=True),
            torch.from_numpy(meta.context_lens).to(dev, non_blocking=True),
        )

    # Sequence management passes straight through to the forker.
    def new_sequence(self) -> int:
        return self.forker.new_sequence()

    def fork(self, seq: int, n: int, at: int = -1) -> list[int]:
        return list(self.forker.fork(seq, n, at))

    def truncate(self, seq: int, length: int) -> None:
        self.forker.truncate(seq, length)

    def free(self, seq: int) -> None:
        self.forker.free(seq)

    def length(self, seq: int) -> int:
        return self.forker.length(seq)

    def free_blocks(self) -> int:
        return self.forker.stats()["free_blocks"]
