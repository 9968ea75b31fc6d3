"""A model whose output layer is larger than its tokenizer, end to end: the engine never samples an
id past the tokenizer and reports the renormalised distribution's log-probs and entropies, the top-10
entropy of ``--arpo-semantics reference`` is vLLM's (the sampled token counted when outside the top
10), and a training step scores its tokens over the tokenizer's ids. Tiny fp32 models on the CPU."""

import pytest
import torch
from helpers import VOCAB, hf_logits, pytorch_kernels, tiny_model

from arpo_fast.engine import Engine, SamplingParams
from arpo_fast.engine.runner import TOP_ENTROPY_K

LIMIT = 211  # the tokenizer's size; the tiny models have VOCAB = 300 output rows
PROMPTS = [[1, 5, 9, 200, 17, 3], [1, 77], [150, 151, 152, 30]]


class SizedTokenizer:
    """What the engine reads of a tokenizer here: its length (and decode, for stop strings)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def decode(self, ids, **kw):
        return " ".join(map(str, ids))


def _float64_step(model, ids, temperature, limit):
    """log p over the first ``limit`` ids of the next-token distribution after ``ids``, float64."""
    z = hf_logits(model, ids)[-1, :limit].double()
    return torch.log_softmax(z / (temperature if temperature > 0 else 1.0), dim=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_samples_only_the_tokenizers_ids(arch):
    """Eager decode through the PyTorch sampler (the kernels are tested on their own): every token
    below len(tokenizer); each log-prob and entropy that of the distribution renormalised over
    those ids (float64 from the plain HF forward)."""
    model = tiny_model(arch)
    engine = Engine(model, block_size=4, num_blocks=64, tokenizer=SizedTokenizer(LIMIT))
    assert engine.vocab_limit == LIMIT and engine.vocab_size == LIMIT
    params = SamplingParams(temperature=2.0, max_new_tokens=16, ignore_eos=True)
    with pytorch_kernels():
        outs = engine.generate(PROMPTS, params, seeds=[3, 4, 5])
    tail_mass = []
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.token_ids) == 16 and max(out.token_ids) < LIMIT
        for i, token in enumerate(out.token_ids):
            ids = prompt + out.token_ids[:i]
            logp = _float64_step(model, ids, 2.0, LIMIT)
            assert out.logprobs[i] == pytest.approx(float(logp[token]), abs=1e-5, rel=1e-4)
            assert out.entropies[i] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-5, rel=1e-4)
            tail_mass.append(float(torch.softmax(hf_logits(model, ids)[-1] / 2.0, -1)[LIMIT:].sum()))
    # without the limit about a third of the draws would have landed past it
    assert sum(tail_mass) / len(tail_mass) > 0.25


def test_engine_limit_through_the_interpreted_sampler():
    model = tiny_model("qwen3")
    engine = Engine(model, block_size=4, num_blocks=32, tokenizer=SizedTokenizer(LIMIT))
    outs = engine.generate(PROMPTS[1:2], SamplingParams(temperature=3.0, max_new_tokens=4, ignore_eos=True))
    assert max(outs[0].token_ids) < LIMIT
    logp = _float64_step(model, PROMPTS[1], 3.0, LIMIT)
    assert outs[0].logprobs[0] == pytest.approx(float(logp[outs[0].token_ids[0]]), abs=1e-5, rel=1e-4)


def test_no_limit_without_a_smaller_tokenizer():
    model = tiny_model("qwen2")
    for tokenizer in (None, SizedTokenizer(VOCAB), SizedTokenizer(VOCAB + 5), object()):
        engine = Engine(model, num_blocks=8, tokenizer=tokenizer)
        assert engine.vocab_limit is None and engine.vocab_size == VOCAB


# ------------------------------------------------------------------------------------------------
# The reference's top-10 entropy: vLLM's returned log-probs, the sampled token included
# ------------------------------------------------------------------------------------------------


def _vllm_top_entropy(logp: torch.Tensor, token: int) -> float:
    """-sum p log p over the entries vLLM returns with logprobs=10: the 10 most likely ids, and the
    sampled id as one more when it is not among them (a dict keyed by id: 10 or 11 entries)."""
    top = logp.topk(TOP_ENTROPY_K).indices.tolist()
    ids = set(top) | {token}
    assert len(ids) == (TOP_ENTROPY_K if token in top else TOP_ENTROPY_K + 1)
    picked = logp[sorted(ids)]
    return float(-(picked.exp() * picked).sum())


@pytest.mark.parametrize("limit", [None, LIMIT])
def test_top_entropy_counts_the_sampled_token_outside_the_top_10(limit):
    """At temperature 3 over a few hundred ids nearly every draw is outside the top 10: its term
    is in the entropy; a greedy row's token is the argmax, inside, and adds nothing."""
    model = tiny_model("qwen2")
    tokenizer = SizedTokenizer(limit) if limit else None
    engine = Engine(model, num_blocks=64, tokenizer=tokenizer)
    rows = [engine.add(p, seed=s) for s, p in enumerate(PROMPTS)]
    params = [
        SamplingParams(temperature=3.0),
        SamplingParams(temperature=3.0),
        SamplingParams(temperature=0.0),
    ]
    with pytorch_kernels():
        out = engine.step(rows, params, top_entropy=[True, True, True])
    outside = 0
    for prompt, p, token, got in zip(PROMPTS, params, out.tokens.tolist(), out.top_entropy.tolist()):
        logp = _float64_step(model, prompt, p.temperature, limit or VOCAB)
        outside += token not in logp.topk(TOP_ENTROPY_K).indices.tolist()
        assert got == pytest.approx(_vllm_top_entropy(logp, token), abs=1e-5, rel=1e-4)
    assert outside == 2  # both sampled rows exercise the 11th entry


# ------------------------------------------------------------------------------------------------
# A training step
# ------------------------------------------------------------------------------------------------


def test_a_training_step_samples_and_scores_over_the_tokenizers_ids(tok, tmp_path, monkeypatch):
    """One step of the trainer on the demo with an output layer 64 rows larger than the tokenizer:
    every trajectory token is below len(tokenizer), the update is told the limit, and each of its
    log-probs is the float64 log-softmax over the first len(tokenizer) logits."""
    import arpo_fast.train.loop as loop
    import arpo_fast.train.padded as padded
    import arpo_fast.train.tree_batch as tree_batch
    from arpo_fast.train.config import TrainConfig
    from arpo_fast.train.demo import demo_model

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch paths, as on a user's CPU
    limit = len(tok)
    model = demo_model(tok, seed=2)
    model.resize_token_embeddings(limit + 64, mean_resizing=False)
    assert model.lm_head.weight.shape[0] == limit + 64
    updates, scored = [], []

    def spy_update(*args, **kw):
        data = args[2]
        updates.append((data.record.trajectories, data.vocab_limit))
        return real_update(*args, **kw)

    def spy_logprob_entropy(hidden, weight, targets, temperature=1.0, **kw):
        out = real_logprob_entropy(hidden, weight, targets, temperature, **kw)
        scored.append((hidden.detach().double(), weight.detach().double(), targets, temperature, out[0]))
        return out

    real_update, real_logprob_entropy = loop.update, padded.logprob_entropy
    monkeypatch.setattr(loop, "update", spy_update)
    for layout in (padded, tree_batch):  # the update's two layouts
        monkeypatch.setattr(layout, "logprob_entropy", spy_logprob_entropy)
    cfg = TrainConfig.from_flat(
        out=str(tmp_path / "run"),
        steps=1,
        prompts_per_step=2,
        rollouts=4,
        initial=2,
        max_response_tokens=24,
        demo_warm_start=0,
        tools="",
        eval_data="none",
    )
    loop.train(cfg, model, tok)
    ((trajectories, vocab_limit),) = updates
    assert vocab_limit == limit
    ids = [i for t in trajectories for i in t.response_ids]
    assert len(ids) > 50 and max(ids) < limit
    assert scored
    moved = 0.0
    for hidden, weight, targets, temperature, logprobs in scored:
        logits = hidden @ weight.t() / temperature
        want = torch.log_softmax(logits[:, :limit], -1).gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(logprobs.double(), want, rtol=1e-4, atol=1e-5)
        unmasked = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        moved = max(moved, float((want - unmasked).abs().max()))
    assert moved > 1e-2  # the extra rows hold real mass: scoring over them would differ


@pytest.mark.gpu
def test_gpu_engine_limit_in_cuda_graph_replays():
    """Decode steps replayed from CUDA graphs sample with the limit too: every token below it, and
    the first decode step's tokens and top-10 entropies equal to the eager step's."""
    model = tiny_model("qwen2").to("cuda")
    outs = []
    for graphs in (False, True):
        engine = Engine(
            model,
            num_blocks=64,
            tokenizer=SizedTokenizer(LIMIT),
            cuda_graphs=graphs,
            max_graph_batch=4,
            max_seq_len=128,
        )
        seqs = [engine.add(p, seed=s) for s, p in enumerate(PROMPTS)]
        engine.step(seqs)  # prefill: eager either way
        steps = [engine.step(seqs, SamplingParams(temperature=2.0), top_entropy=[True] * 3) for _ in range(8)]
        assert (engine.runner.graphs is not None and engine.runner.graphs.replays > 0) == graphs
        outs.append(steps)
    for steps in outs:
        assert all(int(step.tokens.max()) < LIMIT for step in steps)
    first_eager, first_replayed = outs[0][0], outs[1][0]  # the same inputs: the same draw
    assert torch.equal(first_eager.tokens, first_replayed.tokens)
    torch.testing.assert_close(first_eager.top_entropy, first_replayed.top_entropy, rtol=1e-4, atol=1e-5)
