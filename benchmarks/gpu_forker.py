"""GPU report section: a branch through the forker (fork + copy-on-write of the tail) vs a dense KV copy.

Layout: Qwen2.5-7B's KV (28 layers, 4 KV heads, head dim 128), bf16, 16-token blocks.
"""

from __future__ import annotations

import torch
from report import Row, bench_us

from arpo_fast.engine.kv_cache import PagedKVCache

SECTION = "forker"


def _cache(layers, blocks, heads, dim, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return PagedKVCache(layers, blocks, 16, heads, dim, dtype=dtype, device=device)


def _by_slot(cache, layer):
    """The layer's K and V as one [2, blocks * block_size, heads, dim] view, indexed by slot."""
    return cache.kv[layer].flatten(1, 2)


def _slots(cache, seq):
    """The slots of a sequence's tokens in order, int64 [length], from its block table."""
    pos = torch.arange(cache.length(seq), device=cache.device)
    table = torch.as_tensor(cache.forker.block_table(seq), dtype=torch.int64, device=cache.device)
    return table[pos // cache.block_size] * cache.block_size + pos % cache.block_size


def _cow_is_correct(device: str) -> bool:
    """Fork a sequence with a partial tail, write different tokens to each branch, read them back."""
    cache = _cache(2, 64, 2, 16, device)
    parent = cache.new_sequence()
    step = cache.prepare_step([parent], [21])
    data = torch.randn(2, 21, 2, 16, device=device, dtype=cache.kv.dtype)
    for layer in range(2):
        kv = _by_slot(cache, layer)
        kv[0, step.slot_mapping], kv[1, step.slot_mapping] = data[layer], -data[layer]
    kids = cache.fork(parent, 3)
    seqs = [parent] + kids
    step = cache.prepare_step(seqs, [1, 2, 3, 4])
    new = torch.randn(2, 10, 2, 16, device=device, dtype=cache.kv.dtype)
    for layer in range(2):
        kv = _by_slot(cache, layer)
        kv[0, step.slot_mapping], kv[1, step.slot_mapping] = new[layer], -new[layer]
    offset = 0
    for seq, n in zip(seqs, [1, 2, 3, 4]):
        for layer in range(2):
            k, v = _by_slot(cache, layer)[:, _slots(cache, seq)]
            want = torch.cat([data[layer], new[layer, offset : offset + n]])
            if not (torch.equal(k, want) and torch.equal(v, -want)):
                return False
        offset += n
    return True


def rows(smoke: bool) -> list[Row]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers, heads, dim = (2, 2, 16) if smoke else (28, 4, 128)
    correct = _cow_is_correct(device)
    out = [
        Row(SECTION, f"copy-on-write correctness ({device})", "ok", float(correct), target="1", ok=correct)
    ]
    # Prefixes end in a partial block, so each branch pays one block copy in every layer.
    for prefix in [257] if smoke else [4097, 32769]:
        out.append(_branch_row(prefix, layers, heads, dim, device))
    return out


def _branch_row(prefix: int, layers: int, heads: int, dim: int, device: str) -> Row:
    cache = _cache(layers, prefix // 16 + 64, heads, dim, device)
    parent = cache.new_sequence()
    cache.prepare_step([parent], [prefix])

    def branch():
        (child,) = cache.fork(parent, 1)
        cache.prepare_step([child], [1])  # copies the shared partial tail block in every layer
        cache.free(child)

    dense = torch.zeros(layers, 2, prefix, heads, dim, dtype=cache.kv.dtype, device=device)
    ours, peer = bench_us(branch), bench_us(dense.clone)
    return Row(
        SECTION,
        f"branch after {prefix}-token prefix",
        "us",
        ours,
        "dense KV clone",
        peer,
        target="< dense clone",
        ok=ours < peer,
    )
