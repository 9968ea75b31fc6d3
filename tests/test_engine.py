"""The engine against the Hugging Face forward and generate, forks and extends against recompute,
and weight sharing with the trained model (tiny random models, fp32, CPU)."""

import pytest
import torch
from helpers import (
    ARCHS,
    VOCAB,
    hf_greedy,
    hf_logits,
    max_rel_err,
    pytorch_kernels,
    tiny_model,
)

from arpo_fast.engine import Engine, SamplingParams

PROMPTS = [
    [1, 5, 9, 200, 17, 3, 3, 41, 7, 250, 11, 12, 13, 14, 15, 16, 99, 98, 97, 96, 95, 94, 93],
    [1, 77],
    [299, 0, 150, 151, 152, 30, 31, 32, 33, 34, 35, 36, 37],
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=64, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_hf_forward(arch):
    """One ragged prefill step through the (interpreted) Triton extend kernel."""
    model = tiny_model(arch)
    engine = Engine(model, block_size=4, num_blocks=32)
    seqs = [engine.add(p) for p in PROMPTS]
    for p, logits in zip(PROMPTS, engine.logits(seqs, all_positions=True)):
        assert max_rel_err(logits, hf_logits(model, p)) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_matches_hf_generate(arch):
    model = tiny_model(arch)
    engine = Engine(model, block_size=8, num_blocks=64)
    with pytorch_kernels():
        outs = engine.generate(PROMPTS, GREEDY)
    for p, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(model, p, 64)
        assert out.finish_reason == "length"
    assert engine.free_blocks == 64  # generate frees its sequences


def test_decode_steps_through_triton_kernels_match_hf():
    """A few decode steps with the interpreted decode kernel and sampler: greedy tokens and their
    log-probs equal HF's."""
    model = tiny_model("qwen2")
    engine = Engine(model, block_size=4, num_blocks=32)
    outs = engine.generate(PROMPTS[1:], SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    for p, out in zip(PROMPTS[1:], outs):
        assert out.token_ids == hf_greedy(model, p, 3)
        full = hf_logits(model, p + out.token_ids[:-1]).log_softmax(-1)
        expected = full[len(p) - 1 :].gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=1e-4, atol=1e-4)


def _decode(engine, seq, n):
    for _ in range(n):
        engine.step([seq], SamplingParams(temperature=1.0))


@pytest.mark.parametrize("at", [1, 6, 8, 13, 14, None])  # in a block, on a boundary, all cached, end
def test_fork_equals_recompute(at):
    model = tiny_model("qwen3")
    engine = Engine(model, block_size=4, num_blocks=64)
    with pytorch_kernels():
        seq = engine.add(PROMPTS[2][:10], seed=3)
        _decode(engine, seq, 4)  # 10 prompt + 4 sampled tokens cached, one pending
        prefix = engine.tokens(seq)[: at or engine.length(seq)]
        shared_before = engine.free_blocks
        child = engine.fork(seq, 2, at=at)[1]
        assert engine.free_blocks == shared_before  # zero-copy: no block allocated by the fork
        tail = [7, 8, 9, 10, 11]
        engine.extend(child, tail)
        fresh = engine.add(prefix + tail)
        ours = engine.logits([child], all_positions=True)[0]
        ref = engine.logits([fresh], all_positions=True)[0]
    assert max_rel_err(ours, ref[-len(ours) :]) <= 1e-5
    assert max_rel_err(ours, hf_logits(model, prefix + tail)[-len(ours) :]) <= 1e-4
    # The parent is untouched by the child's writes into their shared tail block.
    with pytorch_kernels():
        parent = engine.logits([seq])[0]
    assert max_rel_err(parent, hf_logits(model, engine.tokens(seq))[-1]) <= 1e-4


def test_extend_after_decode_equals_recompute():
    model = tiny_model("llama")
    engine = Engine(model, block_size=4, num_blocks=64)
    with pytorch_kernels():
        seq = engine.add(PROMPTS[0][:7], seed=1)
        _decode(engine, seq, 5)
        engine.extend(seq, [40, 41, 42])  # a tool result after the sampled token
        _decode(engine, seq, 3)
        tokens = engine.tokens(seq)
        engine.extend(seq, [5, 6])
        ours = engine.logits([seq], all_positions=True)[0]
    ref = hf_logits(model, tokens + [5, 6])
    assert max_rel_err(ours, ref[-3:]) <= 1e-4


def test_sampling_is_reproducible_and_independent_of_the_batch():
    model = tiny_model("qwen2")
    with pytorch_kernels():
        alone = Engine(model, num_blocks=64).generate(
            [PROMPTS[0]], SamplingParams(max_new_tokens=12), seeds=[42]
        )
        batched = Engine(model, num_blocks=64).generate(
            PROMPTS, SamplingParams(max_new_tokens=12), seeds=[42, 1, 2]
        )
    assert alone[0].token_ids == batched[0].token_ids
    torch.testing.assert_close(torch.tensor(alone[0].logprobs), torch.tensor(batched[0].logprobs))


def test_top_k_and_top_p_reach_the_sampler_as_numbers_when_rows_share_them(monkeypatch):
    """A value every row shares goes to the sampler as a number (top-k then selects k candidates
    per row instead of sorting whole rows); top_k 0 and top_p 1.0 are off; mixed values go per row."""
    from arpo_fast.engine import runner

    seen = []
    monkeypatch.setattr(runner, "sample", lambda *args, **kw: seen.append(args[4:]))
    logits, temp, seeds, pos = torch.zeros(2, VOCAB), torch.ones(2), torch.arange(2), torch.arange(2)

    def sampled_with(*params):
        runner.sample_rows(logits, list(params), temp, seeds, pos)
        return seen.pop()

    shared = SamplingParams(top_k=40, top_p=0.9)
    assert sampled_with(shared, shared) == (40, 0.9)
    assert sampled_with(SamplingParams(top_k=0, top_p=1.0), SamplingParams(top_k=0)) == (None, None)
    top_k, top_p = sampled_with(SamplingParams(top_k=40), SamplingParams(top_k=0, top_p=0.5))
    assert top_k.tolist() == [40, 0] and top_p.tolist() == [1.0, 0.5]


def test_forked_children_get_distinct_seeds():
    model = tiny_model("qwen2")
    engine = Engine(model, num_blocks=64)
    with pytorch_kernels():
        seq = engine.add(PROMPTS[0], seed=5)
        children = engine.fork(seq, 4) + engine.fork(seq, 2)
        paths = {tuple(child_path) for child_path in _sample_paths(engine, children, 6)}
    assert len(paths) == 6


def _sample_paths(engine, seqs, n):
    for _ in range(n):
        engine.step(seqs, SamplingParams(temperature=2.0))
    return [engine.tokens(s) for s in seqs]


def test_engine_uses_the_live_weights_after_an_optimizer_step():
    model = tiny_model("qwen3")
    engine = Engine(model, num_blocks=64)
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytorch_kernels():
        before = engine.logits([engine.add(PROMPTS[0])])[0]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([PROMPTS[0]])
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with pytorch_kernels():
        after = engine.logits([engine.add(PROMPTS[0])])[0]
    expected = hf_logits(model, PROMPTS[0])[-1]
    assert max_rel_err(after, expected) <= 1e-4
    assert (after - before).abs().max() > 1e-2
    assert params_before == {n: p.data_ptr() for n, p in model.named_parameters()}


def test_pool_size_from_a_byte_budget():
    model = tiny_model("llama")
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # layers, K and V, block, kv heads, head dim, fp32
    engine = Engine(model, block_size=16, kv_memory=10 * per_block + 5)
    assert engine.free_blocks == 10
    assert engine.cache.kv.dtype == torch.float32
    assert all(
        0 <= t < VOCAB for t in engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))[0].token_ids
    )


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_engine_eager_and_cuda_graphs_agree_with_hf(arch, dtype):
    """On CUDA: prompt logits against the HF forward, greedy tokens against HF generate (fp32), and
    the CUDA-graph decode path against the eager one. In bf16 only the first tokens must agree: the
    graphs run padded batch sizes, whose GEMMs may round differently and flip a near-tie."""
    model = tiny_model(arch).to(device="cuda", dtype=dtype)
    eager = Engine(model, block_size=16, num_blocks=256, cuda_graphs=False)
    graphs = Engine(model, block_size=16, num_blocks=256, max_graph_batch=8, max_seq_len=512)
    assert graphs.config.cuda_graphs, "CUDA graphs are the default on a CUDA model"
    a, b = eager.generate(PROMPTS, GREEDY), graphs.generate(PROMPTS, GREEDY)
    assert graphs.runner.graphs is not None and graphs.runner.graphs.replays > 0, "graph capture failed"
    agree = 64 if dtype == torch.float32 else 8  # bf16 and fp16
    for x, y in zip(a, b):
        assert x.token_ids[:agree] == y.token_ids[:agree]
    seqs = [eager.add(p) for p in PROMPTS]
    for p, logits in zip(PROMPTS, eager.logits(seqs, all_positions=True)):
        assert max_rel_err(logits, hf_logits(model, p)) <= (1e-3 if dtype == torch.float32 else 5e-2)
    if dtype == torch.float32:
        for p, out in zip(PROMPTS, a):
            assert out.token_ids == hf_greedy(model, p, 64)


def test_one_step_mixing_prefill_tool_result_and_decode_matches_hf():
    """A decode, a tool result and a fresh prompt in one ragged step (interpreted Triton kernels)."""
    model = tiny_model("qwen3")
    engine = Engine(model, block_size=4, num_blocks=64)
    with pytorch_kernels():
        decoding, tool = engine.add(PROMPTS[0][:9], seed=1), engine.add(PROMPTS[2][:6], seed=2)
        _decode(engine, decoding, 2)
        _decode(engine, tool, 1)
    engine.extend(tool, [11, 12, 13])
    fresh = engine.add(PROMPTS[1])
    seqs = [decoding, tool, fresh]
    expected = [hf_logits(model, engine.tokens(s))[-n:] for s, n in zip(seqs, [1, 4, 2])]
    for ours, ref in zip(engine.logits(seqs, all_positions=True), expected):
        assert ours.shape == ref.shape and max_rel_err(ours, ref) <= 1e-4


def test_parent_and_children_step_together_after_a_fork():
    """All holders of a shared partial tail block write into it in the same step (copy-on-write)."""
    model = tiny_model("llama")
    engine = Engine(model, block_size=4, num_blocks=64)
    with pytorch_kernels():
        parent = engine.add(PROMPTS[0][:10], seed=4)
        _decode(engine, parent, 1)  # 11 tokens: KV of 10 (a partial block), one pending
        family = [parent] + engine.fork(parent, 3)
        for _ in range(4):
            engine.step(family, SamplingParams(temperature=1.5))
        for s in family:
            engine.extend(s, [3])
        logits = engine.logits(family)
    assert len({tuple(engine.tokens(s)) for s in family}) == 4
    for s, ours in zip(family, logits):
        assert max_rel_err(ours, hf_logits(model, engine.tokens(s))[-1]) <= 1e-4
    assert engine.cache.forker.stats()["copies_made"] >= 3


def test_prefill_before_fork_shares_the_tool_result():
    """extend -> prefill -> fork: the tool result is computed once; each branch runs one token."""
    model = tiny_model("qwen2")
    engine = Engine(model, block_size=4, num_blocks=64)
    with pytorch_kernels():
        seq = engine.add(PROMPTS[0][:9], seed=7)
        _decode(engine, seq, 2)
        engine.extend(seq, [50, 51, 52, 53, 54])
        engine.prefill([seq])
        computed = engine.stats["prefill_tokens"]
        branches = engine.fork(seq, 3)
        logits = engine.logits(branches + [seq])
    assert engine.stats["prefill_tokens"] == computed  # every branch ran one token, as a decode
    expected = hf_logits(model, engine.tokens(seq))[-1]
    for row in logits:
        assert max_rel_err(row, expected) <= 1e-4


def test_top_entropy_is_the_reference_estimate_for_the_rows_asked():
    """-sum p log p over each asked row's 10 most likely tokens (and its sampled token when it is
    not among them: ``test_vocab_limit_engine``), from the same logits the sampler read
    (temperature applied); NaN for rows not asked; eager steps and chunked prefills alike."""
    model = tiny_model("qwen2").eval()
    engine = Engine(model, num_blocks=64)
    a, b = engine.add([1, 2, 3], seed=1), engine.add([4, 5], seed=2)
    with torch.no_grad():
        ref = model(torch.tensor([[1, 2, 3]])).logits[0, -1].float() / 0.7
        out = engine.step([a, b], SamplingParams(temperature=0.7), top_entropy=[True, False])
    logp = ref.log_softmax(-1)
    ids = set(logp.topk(10).indices.tolist()) | {int(out.tokens[0])}
    terms = logp[sorted(ids)]
    torch.testing.assert_close(out.top_entropy[0], -(terms.exp() * terms).sum(), rtol=1e-4, atol=1e-5)
    assert torch.isnan(out.top_entropy[1]) and out.top_entropy[0] < out.entropy[0] + 1e-6
    plain = engine.step([a, b], SamplingParams(temperature=0.7))
    assert plain.top_entropy is None
    with pytest.raises(ValueError, match="top_entropy flags"):
        engine.step([a, b], top_entropy=[True])


@pytest.mark.gpu
def test_gpu_top_entropy_from_cuda_graph_replays_matches_eager():
    """A decode step replayed from a CUDA graph reads its top-10 entropies off the graph's logits
    buffer: the same values as the eager step (fp32)."""
    model = tiny_model("qwen2").to("cuda")
    outs = []
    for graphs in (False, True):
        engine = Engine(model, num_blocks=64, cuda_graphs=graphs, max_graph_batch=4, max_seq_len=128)
        seqs = [engine.add([1, 2, 3], seed=1), engine.add([4, 5], seed=2)]
        engine.step(seqs)  # prefill: eager either way
        outs.append(engine.step(seqs, SamplingParams(temperature=0.8), top_entropy=[True, True]))
        assert (engine.runner.graphs is not None and engine.runner.graphs.replays > 0) == graphs
    torch.testing.assert_close(outs[1].top_entropy, outs[0].top_entropy, rtol=1e-4, atol=1e-5)
