"""Output layers with rows past the tokenizer's vocabulary (Qwen2.5: 151,936 rows, 151,665 ids):
``vocab_limit`` in the sampler and in the training log-probs, against float64 oracles over the
first ``vocab_limit`` ids.

The rows past the limit get the largest logits here, so a sampler or a log-prob that counted them
would be far off. The engine and the trainer end to end: ``test_vocab_limit_engine.py``.
"""

import pytest
import torch
from helpers import assert_close64, assert_rule, kept, random_logits, rel_err

from arpo_fast.kernels import logprob_entropy, logprob_entropy_ref, sample, sample_ref

DTYPES = [torch.float32, torch.bfloat16]
NAMES = ("logprobs", "entropy", "grad_hidden", "grad_weight")


def _logits_with_a_loud_tail(B, V, limit, dtype):
    """[B, V] logits whose entries at and past ``limit`` exceed every entry below it by 4 or more."""
    x = random_logits(B, V).float()
    x[:, limit:] = x[:, :limit].max() + 4 + torch.rand(B, V - limit)
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------
# Sampler: the kernel (interpreted) and the reference against float64
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V,limit", [(7, 5), (1000, 731), (32001, 31729), (300, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", [sample, sample_ref], ids=["kernel", "ref"])
def test_sampler_never_draws_past_the_limit(V, limit, dtype, fn):
    B = 2 if V > 10000 else 3
    logits = _logits_with_a_loud_tail(B, V, limit, dtype)
    temps = torch.tensor([1.0, 0.0, 2.5])[:B]  # a greedy row too: the argmax is in the tail
    seeds, pos = torch.arange(B) * 31 + 5, torch.arange(B) + 40
    out = fn(logits, temps, seeds, pos, vocab_limit=limit)
    assert out.valid.all() and bool((out.tokens < limit).all()) and bool((out.tokens >= 0).all())
    # log-prob and entropy of the distribution over the first ``limit`` ids, renormalised
    assert_close64(out, logits[:, :limit], temps)
    # the same draw as a row that never had the extra entries
    alone = fn(logits[:, :limit].contiguous(), temps, seeds, pos)
    assert torch.equal(out.tokens, alone.tokens)


def test_sampler_kernel_and_reference_agree_with_a_limit():
    logits = _logits_with_a_loud_tail(4, 1000, 613, torch.bfloat16)
    args = (logits, torch.tensor([0.6, 1.0, 1.7, 1.0]), torch.arange(4) + 9, torch.arange(4))
    kernel, ref = sample(*args, vocab_limit=613), sample_ref(*args, vocab_limit=613)
    assert torch.equal(kernel.tokens, ref.tokens)
    assert_close64(kernel, logits[:, :613], args[1])


@pytest.mark.parametrize("fn", [sample, sample_ref], ids=["kernel", "ref"])
def test_sampler_limit_with_top_k_and_top_p(fn):
    """Truncation works on the ids below the limit: the tail is neither kept nor counted."""
    B, V, limit = 3, 500, 421
    logits = _logits_with_a_loud_tail(B, V, limit, torch.float32)
    for top_k, top_p in ((5, None), (None, 0.7), (40, 0.5)):
        out = fn(logits, 0.8, 3, torch.arange(B), top_k, top_p, vocab_limit=limit)
        keep = kept(logits[:, :limit], 0.8, top_k, top_p)
        assert bool(keep.gather(1, out.tokens[:, None]).all())
        assert_close64(out, logits[:, :limit], 0.8, keep)


@pytest.mark.parametrize("fn", [sample, sample_ref], ids=["kernel", "ref"])
def test_sampler_limit_at_or_past_the_rows_is_off(fn):
    logits = random_logits(2, 50)
    plain = fn(logits, 1.0, 4, torch.arange(2))
    for limit in (50, 51, 10**9, None):
        out = fn(logits, 1.0, 4, torch.arange(2), vocab_limit=limit)
        assert all(torch.equal(a, b) for a, b in zip(out, plain))


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "7"])
@pytest.mark.parametrize("fn", [sample, sample_ref], ids=["kernel", "ref"])
def test_sampler_bad_limit_is_a_clear_error(fn, bad):
    with pytest.raises(ValueError, match="vocab_limit must be an int >= 1 or None"):
        fn(random_logits(2, 50), vocab_limit=bad)


# ------------------------------------------------------------------------------------------------
# Training log-probs and entropies: both paths and the reference against float64
# ------------------------------------------------------------------------------------------------


def _head(T, H, V, limit, dtype):
    """hidden [T, H], weight [V, H] whose rows past ``limit`` give large logits, targets < limit."""
    u = torch.nn.functional.normalize(torch.randn(H), dim=0)
    hidden = torch.randn(T, H) + 3 * u
    weight = torch.randn(V, H) * (3.0 / H**0.5)
    weight[limit:] = 4 * u + 0.1 * torch.randn(V - limit, H)  # logits of about 12 +- 4
    targets = torch.randint(0, limit, (T,))
    targets[0], targets[-1] = 0, limit - 1
    return hidden.to(dtype), weight.to(dtype), targets


def _outputs_and_grads(fn, hidden, weight, targets, g_lp, g_ent, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    lp, ent = fn(h, w, targets, **kw)
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _oracle(h, w, t, *, temperature, limit):
    """The float64 truth, knowing nothing of ``vocab_limit``: the plain computation on the first
    ``limit`` rows of the head (the rest then get zero gradient through the slice)."""
    return logprob_entropy_ref(h, w[:limit], t, temperature)


@pytest.mark.parametrize(
    "T,H,V,limit,chunk",
    [(37, 19, 1000, 731, 300), (9, 16, 97, 89, None), (11, 16, 33, 17, 5), (5, 3, 7, 1, 2)],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interpret", ["1", "0"], ids=["kernel", "torch"])
def test_logprob_entropy_covers_the_ids_below_the_limit(T, H, V, limit, chunk, dtype, interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)  # "0": the blocked PyTorch path of CPU tensors
    hidden, weight, targets = _head(T, H, V, limit, dtype)
    g_lp, g_ent = torch.randn(T), torch.randn(T)
    kw = dict(temperature=0.9, vocab_limit=limit)
    got = _outputs_and_grads(logprob_entropy, hidden, weight, targets, g_lp, g_ent, chunk_size=chunk, **kw)
    ref = _outputs_and_grads(logprob_entropy_ref, hidden, weight, targets, g_lp, g_ent, **kw)
    exact = _outputs_and_grads(
        _oracle, hidden.double(), weight.double(), targets, g_lp, g_ent, temperature=0.9, limit=limit
    )
    assert_rule(got, ref, exact, 1e-6, NAMES)
    for name, r, e in zip(NAMES, ref, exact):  # the reference's own error: its dtype's rounding
        assert rel_err(r, e) <= (1e-5 if dtype == torch.float32 else 3e-2), name
    assert not got[3][limit:].any() and not ref[3][limit:].any()  # no gradient to the extra rows
    assert got[1].max() <= torch.log(torch.tensor(float(limit))) + 1e-4  # an entropy over limit ids


def test_logprob_entropy_refuses_a_target_past_the_limit():
    hidden, weight, targets = _head(4, 3, 20, 15, torch.float32)
    targets[2] = 17
    for fn in (logprob_entropy, logprob_entropy_ref):
        with pytest.raises(ValueError, match=r"target 17 .* outside the vocabulary \[0, 15\)"):
            fn(hidden, weight, targets, vocab_limit=15)
    with pytest.raises(ValueError, match="vocab_limit must be an int >= 1 or None"):
        logprob_entropy(hidden, weight, targets, vocab_limit=0)


def test_logprob_entropy_limit_at_or_past_the_rows_is_off():
    hidden, weight, targets = _head(6, 4, 30, 30, torch.float32)
    plain = logprob_entropy(hidden, weight, targets)
    for limit in (30, 31, None):
        out = logprob_entropy(hidden, weight, targets, vocab_limit=limit)
        assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])


# ------------------------------------------------------------------------------------------------
# GPU: Qwen2.5's sizes (skipped without CUDA)
# ------------------------------------------------------------------------------------------------

QWEN_ROWS, QWEN_IDS = 151936, 151665


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_sampler_with_qwens_limit(dtype):
    B = 64
    logits = _logits_with_a_loud_tail(B, QWEN_ROWS, QWEN_IDS, dtype).cuda()
    temps = (torch.rand(B) * 2 + 0.05).cuda()
    temps[::5] = 0.0
    seeds, pos = torch.arange(B, device="cuda") * 13, torch.arange(B, device="cuda")
    out = sample(logits, temps, seeds, pos, vocab_limit=QWEN_IDS)
    ref = sample_ref(logits, temps, seeds, pos, vocab_limit=QWEN_IDS)
    assert bool((out.tokens < QWEN_IDS).all()) and bool((out.tokens >= 0).all())
    assert (out.tokens == ref.tokens).float().mean() >= 0.98  # float-rounding ties at boundaries
    assert_close64(out, logits[:, :QWEN_IDS], temps)


@pytest.mark.gpu
def test_gpu_sampler_with_a_limit_under_cuda_graph_capture():
    B = 8
    logits = _logits_with_a_loud_tail(B, QWEN_ROWS, QWEN_IDS, torch.bfloat16).cuda()
    temps, seeds = torch.ones(B, device="cuda"), torch.arange(B, device="cuda")
    pos = torch.arange(B, device="cuda")
    eager = sample(logits, temps, seeds, pos, vocab_limit=QWEN_IDS)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sample(logits, temps, seeds, pos, vocab_limit=QWEN_IDS)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.tokens, eager.tokens) and bool((captured.tokens < QWEN_IDS).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_logprob_entropy_with_a_limit(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    T, H, V, limit = 1031, 512, 32001, 31733
    hidden, weight, targets = (x.cuda() for x in _head(T, H, V, limit, dtype))
    g_lp, g_ent = torch.randn(T, device="cuda"), torch.randn(T, device="cuda")
    kw = dict(temperature=0.7, vocab_limit=limit)
    got = _outputs_and_grads(logprob_entropy, hidden, weight, targets, g_lp, g_ent, chunk_size=5000, **kw)
    ref = _outputs_and_grads(logprob_entropy_ref, hidden, weight, targets, g_lp, g_ent, **kw)
    exact = _outputs_and_grads(
        _oracle, hidden.double(), weight.double(), targets, g_lp, g_ent, temperature=0.7, limit=limit
    )
    assert_rule(got, ref, exact, 1e-6, NAMES)
    assert not got[3][limit:].any()
