"""A pure-Python KV forker with the same semantics and API as ``arpo_fast._C.KVForker``.

It is the reference the native forker is tested against (the two run in lockstep and must agree on
lengths, block tables, copy pairs and errors) and the baseline its benchmarks compare with. Block
ids come from the same free-list discipline, so both hand out identical block numbers.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from arpo_fast.errors import PoolExhaustedError, UnknownSequenceError
from arpo_fast.step_metadata import StepMetadata


class PyKVForker:
    """Paged KV block tables with reference counts, in Python (see ``arpo_fast._C.KVForker``)."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if not 1 <= num_blocks <= 2**31 - 1:
            raise ValueError(f"num_blocks must be in [1, 2^31-1], got {num_blocks}")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._tables: list[list[int] | None] = []  # None once freed
        self._lengths: list[int] = []
        self._pending: list[tuple[int, int]] = []
        self._copies_made = 0

    # -- helpers ---------------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _table(self, seq: int) -> list[int]:
        if not 0 <= seq < len(self._tables):
            raise UnknownSequenceError(f"unknown sequence id {seq} (never created)")
        table = self._tables[seq]
        if table is None:
            raise UnknownSequenceError(f"unknown sequence id {seq} (already freed)")
        return table

    def _live(self, seq: int) -> list[int]:
        """The block table of ``seq``, already checked to be live by the caller."""
        table = self._tables[seq]
        assert table is not None, f"sequence {seq} was checked live"
        return table

    def _needs_cow(self, seq: int, n: int) -> bool:
        table = self._live(seq)
        return n > 0 and self._lengths[seq] % self.block_size != 0 and self._ref[table[-1]] > 1

    def _exhausted(self, needed: int, what: str) -> PoolExhaustedError:
        return PoolExhaustedError(
            f"KV pool exhausted: {what} needs {needed} free blocks but only {len(self._free)} of "
            f"{self.num_blocks} are free (block_size {self.block_size}); nothing was changed. "
            "Free finished sequences or give the pool more blocks."
        )

    def _allocate(self) -> int:
        block = self._free.pop()
        self._ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._free.append(block)
            self._pending = [p for p in self._pending if p[1] != block]

    def _grow(self, seq: int, n: int) -> None:
        if n == 0:
            return
        table = self._live(seq)
        if self._needs_cow(seq, n):
            src, dst = table[-1], self._allocate()
            self._ref[src] -= 1
            table[-1] = dst
            self._pending.append((src, dst))
            self._copies_made += 1
        self._lengths[seq] += n
        while len(table) < self._blocks_for(self._lengths[seq]):
            table.append(self._allocate())

    # -- public API ------------------------------------------------------------------------
    def new_sequence(self) -> int:
        self._tables.append([])
        self._lengths.append(0)
        return len(self._tables) - 1

    def append(self, seq: int, n: int) -> None:
        table = self._table(seq)
        if n < 0:
            raise ValueError(f"append: n must be >= 0, got {n}")
        if n == 0:
            return
        needed = self._blocks_for(self._lengths[seq] + n) - len(table) + self._needs_cow(seq, n)
        if needed > len(self._free):
            raise self._exhausted(needed, f"appending {n} tokens to sequence {seq}")
        self._grow(seq, n)

    def fork(self, seq: int, n: int, at: int = -1) -> list[int]:
        table = self._table(seq)
        if n < 0:
            raise ValueError(f"fork: n must be >= 0, got {n}")
        length = self._lengths[seq]
        if at < 0:
            at = length
        if at > length:
            raise ValueError(f"fork: at={at} is past the length {length} of sequence {seq}")
        shared = table[: self._blocks_for(at)]
        children = []
        for _ in range(n):
            for block in shared:
                self._ref[block] += 1
            self._tables.append(list(shared))
            self._lengths.append(at)
            children.append(len(self._tables) - 1)
        return children

    def truncate(self, seq: int, length: int) -> None:
        table = self._table(seq)
        if not 0 <= length <= self._lengths[seq]:
            raise ValueError(
                f"truncate: length {length} is outside [0, {self._lengths[seq]}] for sequence {seq}"
            )
        keep = self._blocks_for(length)
        while len(table) > keep:
            self._release(table.pop())
        self._lengths[seq] = length

    def free(self, seq: int) -> None:
        table = self._table(seq)
        for block in reversed(table):
            self._release(block)
        self._tables[seq] = None
        self._lengths[seq] = 0

    def length(self, seq: int) -> int:
        self._table(seq)
        return self._lengths[seq]

    def alive(self, seq: int) -> bool:
        return 0 <= seq < len(self._tables) and self._tables[seq] is not None

    def block_table(self, seq: int) -> np.ndarray:
        return np.asarray(self._table(seq), dtype=np.int32)

    def ref_count(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block id out of range: {block}")
        return self._ref[block]

    @property
    def pending_copies(self) -> int:
        return len(self._pending)

    def take_copies(self) -> np.ndarray:
        pairs, self._pending = self._pending, []
        return np.asarray(pairs, dtype=np.int32).reshape(-1, 2)

    def prepare_step(self, seqs, new_tokens, min_width: int = 0) -> StepMetadata:
        seqs = [int(s) for s in np.asarray(seqs, dtype=np.int64).reshape(-1)]
        new_tokens = [int(n) for n in np.asarray(new_tokens, dtype=np.int64).reshape(-1)]
        if len(seqs) != len(new_tokens):
            raise ValueError(
                f"prepare_step: seqs has {len(seqs)} entries but new_tokens has {len(new_tokens)}"
            )
        needed, seen, cow = 0, set(), Counter[int]()
        for i, (seq, n) in enumerate(zip(seqs, new_tokens)):
            table = self._table(seq)
            if n < 0:
                raise ValueError(f"prepare_step: new_tokens[{i}] = {n} is negative")
            if seq in seen:
                raise ValueError(f"prepare_step: sequence {seq} appears twice in the batch")
            seen.add(seq)
            needed += self._blocks_for(self._lengths[seq] + n) - len(table)
            if self._needs_cow(seq, n):
                cow[table[-1]] += 1
        # A shared tail written by all of its holders is copied by all but the last writer.
        needed += sum(c - (c == self._ref[b]) for b, c in cow.items())
        if needed > len(self._free):
            raise self._exhausted(needed, f"a step of {len(seqs)} sequences and {sum(new_tokens)} new tokens")
        slots: list[int] = []
        for seq, n in zip(seqs, new_tokens):
            start = self._lengths[seq]
            self._grow(seq, n)
            table = self._live(seq)
            bs = self.block_size
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        width = max([max(min_width, 0)] + [len(self._tables[s]) for s in seqs])
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        for row, seq in enumerate(seqs):
            table = self._tables[seq]
            tables[row, : len(table)] = table
        lens = np.asarray([self._lengths[s] for s in seqs], dtype=np.int32)
        return StepMetadata(np.asarray(slots, dtype=np.int64), tables, lens, self.take_copies())

    def check_invariants(self) -> None:
        counted = Counter[int]()
        for seq, table in enumerate(self._tables):
            if table is None:
                continue
            assert len(table) == self._blocks_for(self._lengths[seq]), (
                f"sequence {seq} has {len(table)} blocks for length {self._lengths[seq]}"
            )
            counted.update(table)
        assert len(set(self._free)) == len(self._free), "a block is free twice"
        free = set(self._free)
        for block in range(self.num_blocks):
            assert counted[block] == self._ref[block], (
                f"block {block} has reference count {self._ref[block]} but {counted[block]} tables hold it"
            )
            assert (self._ref[block] == 0) == (block in free), f"block {block}: free list is off"
        assert all(self._ref[dst] > 0 for _, dst in self._pending), "a pending copy targets a free block"

    def stats(self) -> dict:
        live = sum(t is not None for t in self._tables)
        return {
            "free_blocks": len(self._free),
            "used_blocks": self.num_blocks - len(self._free),
            "shared_blocks": sum(r > 1 for r in self._ref),
            "copies_made": self._copies_made,
            "live_sequences": live,
        }
