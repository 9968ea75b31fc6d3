"""The KV pool given back between rollouts and taken back: the same tokens after, no memory held
while released, and captured decode graphs dropped when the pool or a weight moved."""

import pytest
import torch
from helpers import pytorch_kernels, tiny_model

from arpo_fast.engine import Engine, SamplingParams
from arpo_fast.engine.cuda_graphs import DecodeGraphs

PROMPTS = [[1, 5, 9, 200, 17, 3], [1, 77], [299, 0, 150, 151, 152]]


def _sample(engine):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20, ignore_eos=True), seeds=[4, 5, 6])
    return [c.token_ids for c in out], [c.logprobs for c in out]


def test_rollouts_after_release_and_reacquire_sample_the_same_tokens():
    engine = Engine(tiny_model("qwen2"), block_size=4, num_blocks=48)
    pool_bytes = engine.cache.kv.untyped_storage().nbytes()
    with pytorch_kernels():
        before, lp_before = _sample(engine)
        for _ in range(2):
            engine.release()
            assert engine.released and engine.cache.kv.untyped_storage().nbytes() == 0
            engine.release()  # idempotent
            with pytest.raises(RuntimeError, match="the KV pool is released; reacquire"):
                engine.add([1, 2, 3])
            engine.reacquire()
            assert not engine.released and engine.cache.kv.untyped_storage().nbytes() == pool_bytes
            assert int(engine.cache.kv.count_nonzero()) == 0
            after, lp_after = _sample(engine)
            assert after == before
            torch.testing.assert_close(torch.tensor(lp_after[0]), torch.tensor(lp_before[0]))


def test_release_with_a_live_sequence_is_an_error_and_keeps_its_kv():
    engine = Engine(tiny_model("qwen2"), block_size=4, num_blocks=16)
    with pytorch_kernels():
        seq = engine.add([1, 2, 3, 4, 5])
        engine.step([seq])
        with pytest.raises(RuntimeError, match="1 sequences still hold KV; free them first"):
            engine.release()
        assert not engine.released
        engine.step([seq])  # still usable
        engine.free(seq)
    engine.release()
    assert engine.released


def test_decode_graphs_are_dropped_only_when_the_pool_or_a_weight_moved():
    engine = Engine(tiny_model("qwen2"), block_size=4, num_blocks=16)
    graphs = DecodeGraphs(engine.model, engine.cache, max_batch=2, max_width=4)  # nothing captured
    graphs.graphs = {1: "captured"}
    graphs.captured_at = graphs.addresses()
    assert not graphs.drop_if_moved() and graphs.graphs
    weight = next(engine.model.hf.parameters())
    weight.data = weight.data.clone()  # a weight whose storage was rebuilt
    assert graphs.drop_if_moved() and graphs.graphs == {}
