"""Engine input errors, pool exhaustion (raise and preempt), stop conditions and unsupported models.

Every bad input raises a clear exception before any state changes: the test then checks that the
engine still holds what it held and keeps working.
"""

import pytest
import torch
from helpers import VOCAB, pytorch_kernels, tiny_model

from arpo_fast.engine import Engine, EngineConfig, SamplingParams
from arpo_fast.errors import PoolExhaustedError, UnknownSequenceError


@pytest.fixture(autouse=True)
def _reference_kernels():
    with pytorch_kernels():
        yield


@pytest.fixture
def engine():
    return Engine(tiny_model("qwen2"), block_size=4, num_blocks=16)


def _snapshot(engine):
    return engine.live(), {s: engine.tokens(s) for s in engine.live()}, engine.free_blocks


class CharTokenizer:
    """Decodes token t to one letter; enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(97 + t % 26) for t in ids)


@pytest.mark.parametrize(
    "bad,match",
    [
        ([], "empty"),
        ([1, VOCAB], "outside the vocabulary"),
        ([-1, 3], "outside the vocabulary"),
        (["x"], "integers"),
        ([1, 2.5], "integers"),
        (None, "integers"),
    ],
)
def test_add_and_extend_reject_bad_tokens(engine, bad, match):
    seq = engine.add([1, 2, 3])
    before = _snapshot(engine)
    with pytest.raises(ValueError, match=match):
        engine.add(bad)
    with pytest.raises(ValueError, match=match):
        engine.extend(seq, bad)
    assert _snapshot(engine) == before
    engine.step([seq], SamplingParams())


def test_unknown_sequences_raise(engine):
    seq = engine.add([1, 2, 3])
    engine.free(seq)
    for call in (
        lambda: engine.extend(seq, [1]),
        lambda: engine.step([seq]),
        lambda: engine.fork(seq, 1),
        lambda: engine.free(seq),
        lambda: engine.logits([seq]),
        lambda: engine.step([12345]),
        lambda: engine.tokens("7"),
    ):
        with pytest.raises(UnknownSequenceError, match="unknown sequence"):
            call()
    assert engine.live() == [] and engine.free_blocks == 16


def test_step_and_fork_argument_errors_change_nothing(engine):
    a, b = engine.add([1, 2, 3]), engine.add([4, 5])
    engine.logits([b])  # b has no pending token now
    before = _snapshot(engine)
    with pytest.raises(ValueError, match="twice"):
        engine.step([a, a])
    with pytest.raises(ValueError, match="no pending tokens"):
        engine.step([a, b])
    with pytest.raises(UnknownSequenceError):
        engine.step([a, 99])
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.step([a], [SamplingParams(), SamplingParams()])
    for kwargs in ({"n": -1}, {"n": 2, "at": 0}, {"n": 2, "at": 4}, {"n": 1.5}):
        with pytest.raises(ValueError, match="fork"):
            engine.fork(a, **kwargs)
    with pytest.raises(ValueError, match="seed"):
        engine.add([1], seed=-1)
    assert _snapshot(engine) == before
    assert engine.step([a]).ran.all()


def test_config_and_params_errors():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be an int >= 0 \\(0: off\\)"):
        SamplingParams(top_k=None)  # one convention: 0 is off
    with pytest.raises(ValueError, match="top_p must be a number in \\(0, 1\\] \\(1.0: off\\)"):
        SamplingParams(top_p=None)
    with pytest.raises(ValueError, match="on_pool_exhausted"):
        EngineConfig(on_pool_exhausted="wait")
    with pytest.raises(ValueError, match="power of two"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="holds no block"):
        Engine(tiny_model("llama"), kv_memory=100)


def test_generate_validates_every_prompt_before_adding_any(engine):
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([[1, 2], [], [3]])
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([[1, 2]], SamplingParams(stop=["ab"]))
    with pytest.raises(ValueError, match="seed"):
        engine.generate([[1, 2], [3]], seeds=[0, -5])
    assert engine.live() == [] and engine.free_blocks == 16


def test_pool_exhausted_raises_and_changes_nothing(engine):
    a = engine.add(list(range(3, 45)))  # 42 tokens: 11 of 16 blocks
    engine.step([a])
    b = engine.add(list(range(10, 32)))  # 22 tokens: 6 blocks, only 5 free
    before = _snapshot(engine)
    with pytest.raises(PoolExhaustedError, match="KV pool exhausted"):
        engine.step([a, b])
    assert _snapshot(engine) == before
    engine.step([a])  # a alone still fits and is intact
    engine.free(a)
    assert engine.step([b]).ran.all()


def test_generate_frees_its_sequences_when_the_pool_runs_out(engine):
    with pytest.raises(PoolExhaustedError):
        engine.generate([list(range(3, 60)), list(range(3, 30))], SamplingParams(max_new_tokens=4))
    assert engine.live() == [] and engine.free_blocks == 16


def test_preemption_gives_the_same_result_as_a_large_pool():
    model = tiny_model("qwen3")
    prompts = [[1, 2, 3, 4, 5], [7, 8], list(range(20, 33)), [9, 9, 9]]
    params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    big = Engine(model, block_size=4, num_blocks=64).generate(prompts, params, seeds=[1, 2, 3, 4])
    small = Engine(model, block_size=4, num_blocks=8, on_pool_exhausted="preempt")
    out = small.generate(prompts, params, seeds=[1, 2, 3, 4])
    assert small.stats["preemptions"] > 0
    for x, y in zip(out, big):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=1e-4, atol=1e-4)
    assert small.free_blocks == 8


def test_preemption_defers_but_never_loses_a_sequence():
    small = Engine(tiny_model("qwen3"), block_size=4, num_blocks=6, on_pool_exhausted="preempt")
    old, young = small.add(list(range(3, 16))), small.add(list(range(20, 30)))
    out = small.step([old, young])  # 13 + 10 tokens need 7 blocks: the youngest waits
    assert out.ran.tolist() == [True, False] and out.tokens[1] == -1
    assert small.tokens(young) == list(range(20, 30))
    small.free(old)
    assert small.step([young]).ran.all()
    with pytest.raises(PoolExhaustedError):  # one sequence larger than the whole pool
        small.step([small.add(list(range(3, 40)))])


def test_stop_conditions():
    model = tiny_model("qwen2")
    free_run = (
        Engine(model, num_blocks=32)
        .generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))[0]
        .token_ids
    )
    greedy = {"temperature": 0.0, "max_new_tokens": 12}

    def first(tok):
        return free_run.index(tok) + 1

    engine = Engine(model, num_blocks=32, tokenizer=CharTokenizer())
    out = engine.generate(
        [[1, 2, 3]], SamplingParams(stop_token_ids=[free_run[5]], ignore_eos=True, **greedy)
    )[0]
    assert out.token_ids == free_run[: first(free_run[5])] and out.finish_reason == "stop_token"
    text = CharTokenizer().decode(free_run)
    out = engine.generate([[1, 2, 3]], SamplingParams(stop=[text[3:5]], ignore_eos=True, **greedy))[0]
    assert out.finish_reason == "stop_string" and text[3:5] in CharTokenizer().decode(out.token_ids)
    assert text[3:5] not in CharTokenizer().decode(out.token_ids[:-1])
    model.generation_config.eos_token_id = free_run[2]
    out = Engine(model, num_blocks=32).generate([[1, 2, 3]], SamplingParams(**greedy))[0]
    assert out.token_ids == free_run[: first(free_run[2])] and out.finish_reason == "eos"
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == free_run[:4] and out.finish_reason == "length"


def test_unsupported_models_are_rejected_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'.*llama, qwen2, qwen3"):
        Engine(gpt2, num_blocks=4)
    sliding = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=0,
        )
    )
    with pytest.raises(ValueError, match="sliding-window"):
        Engine(sliding, num_blocks=4)


def test_cuda_graphs_need_a_cuda_model():
    with pytest.raises(ValueError, match="cuda_graphs needs a model on a CUDA device"):
        Engine(tiny_model("llama"), num_blocks=8, cuda_graphs=True)
    engine = Engine(tiny_model("llama"), num_blocks=8)  # the default: graphs on CUDA models only
    assert engine.config.cuda_graphs is False and engine.runner.graphs is None


def test_batch_dependent_rope_is_rejected():
    model = tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        Engine(model, num_blocks=8)


def test_prefill_in_groups_gives_the_same_result():
    model = tiny_model("llama")
    prompts = [[1, 2, 3, 4, 5], [7, 8], list(range(20, 33)), [9, 9, 9]]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True)
    one = Engine(model, num_blocks=64).generate(prompts, params)
    grouped = Engine(model, num_blocks=64, max_prefill_tokens=6).generate(prompts, params)
    assert [o.token_ids for o in one] == [o.token_ids for o in grouped]


def test_python_reference_forker_gives_the_same_result():
    model = tiny_model("qwen2")
    prompts = [[1, 2, 3, 4, 5], list(range(20, 33))]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True)
    native = Engine(model, block_size=4, num_blocks=8, on_pool_exhausted="preempt").generate(prompts, params)
    python = Engine(model, block_size=4, num_blocks=8, on_pool_exhausted="preempt", forker="python").generate(
        prompts, params
    )
    assert [o.token_ids for o in native] == [o.token_ids for o in python]
