"""Copy-on-write with real K/V tensors: forks see the shared prefix and only their own new tokens."""

import pytest
import torch

from arpo_fast.engine.kv_cache import PagedKVCache
from arpo_fast.errors import PoolExhaustedError

LAYERS, HEADS, DIM = 3, 2, 8


def token_kv(token_ids, layer, marker=0.0):
    """Deterministic K/V for tokens: [n, HEADS, DIM], distinct per (token, layer)."""
    base = torch.tensor(token_ids, dtype=torch.float32)[:, None, None]
    grid = torch.arange(HEADS * DIM, dtype=torch.float32).view(1, HEADS, DIM)
    k = base * 1000 + grid + layer * 100 + marker
    return k, -k


def write_kv(cache, layer, slot_mapping, k, v):
    """Store new tokens' K and V ([N, HEADS, DIM]) at their slots (int64 [N])."""
    kv = cache.kv[layer].flatten(1, 2)  # [2, blocks * block_size, HEADS, DIM], a view
    kv[0, slot_mapping], kv[1, slot_mapping] = k, v


def read_kv(cache, layer, seq):
    """A sequence's K and V, [length, HEADS, DIM] each, read through its block table."""
    table = torch.as_tensor(cache.forker.block_table(seq), dtype=torch.int64)
    kv = cache.kv[layer, :, table].flatten(1, 2)[:, : cache.length(seq)]
    return kv[0], kv[1]


def write_tokens(cache, seqs, tokens_per_seq):
    step = cache.prepare_step(seqs, [len(t) for t in tokens_per_seq])
    flat = [t for toks in tokens_per_seq for t in toks]
    for layer in range(LAYERS):
        k, v = token_kv(flat, layer)
        write_kv(cache, layer, step.slot_mapping, k, v)
    return step


def check_holds(cache, seq, tokens):
    for layer in range(LAYERS):
        k, v = read_kv(cache, layer, seq)
        ek, ev = token_kv(tokens, layer)
        torch.testing.assert_close(k, ek, rtol=0, atol=0)
        torch.testing.assert_close(v, ev, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["native", "python"])
@pytest.mark.parametrize("prefix_len", [8, 11])  # block-aligned and a partial tail
def test_forked_branches_keep_their_own_tokens(backend, prefix_len):
    cache = PagedKVCache(LAYERS, 32, 4, HEADS, DIM, forker=backend)
    parent = cache.new_sequence()
    prefix = list(range(1, prefix_len + 1))
    write_tokens(cache, [parent], [prefix])
    kids = cache.fork(parent, 3)
    used_after_fork = cache.forker.stats()["used_blocks"]
    assert used_after_fork == -(-prefix_len // 4), "a fork must not allocate or copy"
    tails = {parent: [500, 501, 502], kids[0]: [600], kids[1]: [700, 701, 702, 703, 704], kids[2]: [800, 801]}
    step = write_tokens(cache, list(tails), list(tails.values()))
    for seq, tail in tails.items():
        check_holds(cache, seq, prefix + tail)
    # Shared full blocks are still shared: nothing but the partial tail was ever copied.
    copies = cache.forker.stats()["copies_made"]
    assert copies == (3 if prefix_len % 4 else 0)
    assert step.context_lens.tolist() == [prefix_len + len(t) for t in tails.values()]


def test_fork_mid_sequence_then_extend():
    cache = PagedKVCache(LAYERS, 32, 4, HEADS, DIM)
    parent = cache.new_sequence()
    tokens = list(range(10, 24))
    write_tokens(cache, [parent], [tokens])
    (child,) = cache.fork(parent, 1, at=6)
    write_tokens(cache, [child], [[900, 901, 902]])
    check_holds(cache, child, tokens[:6] + [900, 901, 902])
    check_holds(cache, parent, tokens)


def test_copies_run_as_one_batched_op(monkeypatch):
    cache = PagedKVCache(LAYERS, 32, 4, HEADS, DIM)
    parent = cache.new_sequence()
    write_tokens(cache, [parent], [[1, 2, 3, 4, 5, 6]])
    kids = cache.fork(parent, 4)
    calls = []
    real = torch.Tensor.index_copy_
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda self, *a: calls.append(a) or real(self, *a))
    cache.run_copies(cache.forker.prepare_step(kids, [1, 1, 1, 1]).copies)
    assert len(calls) == 1  # four block copies, all layers, K and V: one scatter


def test_exhausted_pool_leaves_kv_and_tables_intact():
    cache = PagedKVCache(LAYERS, 4, 4, HEADS, DIM)
    a = cache.new_sequence()
    write_tokens(cache, [a], [[1, 2, 3, 4, 5, 6]])
    b = cache.new_sequence()
    snapshot = cache.kv.clone()
    with pytest.raises(PoolExhaustedError, match="nothing was changed"):
        cache.prepare_step([a, b], [4, 9])
    assert torch.equal(cache.kv, snapshot)
    assert cache.length(a) == 6 and cache.length(b) == 0
    check_holds(cache, a, [1, 2, 3, 4, 5, 6])


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="kv_heads must be positive"):
        PagedKVCache(1, 4, 4, 0, 8)
    with pytest.raises(ValueError, match="unknown forker backend"):
        PagedKVCache(1, 4, 4, 1, 8, forker="rust")
