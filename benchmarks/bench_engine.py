"""Rollout engine benchmarks on the CPU: generation throughput against HF ``generate``, and the
branching workload (fork after a shared prefix against re-prefilling every branch).

    python benchmarks/bench_engine.py            # prints the tables recorded in RESULTS.md
    python benchmarks/bench_engine.py --quick    # smaller sizes
    python -m pytest benchmarks/bench_engine.py --benchmark-only   # the same peers, small sizes

The workload functions are shared with ``gpu_engine.py`` (same code, GPU sizes). Peers run in the
same process on the same model object: HF ``generate`` (greedy, its default dynamic cache), and for
branching a prefix-resubmitting rollout that prefills each branch's whole prefix again (what a
rollout that resubmits token lists pays without a prefix cache).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Section, add_output_args, emit, timed  # noqa: E402 - after sys.path is set

from arpo_fast.engine import Engine, SamplingParams  # noqa: E402 - after sys.path is set
from arpo_fast.engine.random_model import random_causal_lm  # noqa: E402 - after sys.path is set


def tiny_model(hidden: int = 128, layers: int = 4, vocab: int = 1024, dtype=torch.float32, device="cpu"):
    """A small random Qwen2 model (the benchmarks' CPU model), drawn on the CPU, then moved."""
    model = random_causal_lm(
        "qwen2",
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=4,
        kv_heads=2,
        intermediate=4 * hidden,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return model.to(device=device, dtype=dtype)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def engine_generate_tps(engine: Engine, prompts, new_tokens: int) -> float:
    """Generated tokens per second of ``engine.generate`` (greedy, exactly new_tokens each)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    engine.generate(
        [p[:8] for p in prompts[:2]], SamplingParams(temperature=0.0, max_new_tokens=2)
    )  # warm-up
    outs, seconds = timed(lambda: engine.generate(prompts, params))
    return sum(len(o.token_ids) for o in outs) / seconds


def hf_generate_tps(model, prompts, new_tokens: int) -> float:
    """Generated tokens per second of HF ``generate`` (greedy, default cache) on equal-length prompts."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        model.generate(
            ids[:2, :8], max_new_tokens=2, **{**kw, "attention_mask": torch.ones_like(ids[:2, :8])}
        )
        out, seconds = timed(
            lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        )
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds


def branching(
    model,
    prompts: int,
    branches: int,
    prefix: int,
    new_tokens: int,
    block_size: int = 16,
    num_blocks=None,
    chunk: int = 0,
) -> dict:
    """ARPO branching: each of ``prompts`` prefixes of ``prefix`` tokens continues as ``branches``
    branches for ``new_tokens`` sampled tokens.

    fork: prefill each prefix once, fork it (zero-copy; each child re-runs the prefix's last token so
    it can sample its own next one), then decode the branches together.
    reprefill: every branch is a fresh sequence holding the whole prefix (prefilled again), then the
    same decode. ``chunk`` > 0 prefills at most that many sequences per step (bounds peak memory).
    Returns prefill tokens computed and wall seconds of each.
    """
    vocab = model.config.vocab_size
    texts = random_prompts(prompts, prefix, vocab, seed=1)
    result = {}
    for mode in ("fork", "reprefill"):
        # Eager steps in both modes: the comparison is about prefill work, and a first graph
        # capture (the default on CUDA) would be charged to whichever mode decodes first.
        engine = Engine(model, block_size=block_size, num_blocks=num_blocks, cuda_graphs=False)
        work = lambda e=engine: _branch_rollout(e, mode, texts, branches, prefix, new_tokens, chunk)
        _, seconds = timed(work)
        result[mode] = {"prefill_tokens": engine.stats["prefill_tokens"], "seconds": seconds}
        del engine, work  # the closure holds the engine too
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the pool back before the next engine sizes its own
    return result


def _branch_rollout(engine, mode: str, texts, branches: int, prefix: int, new_tokens: int, chunk: int):
    params = SamplingParams(temperature=1.0)
    if mode == "fork":
        roots = [engine.add(t, seed=i) for i, t in enumerate(texts)]
        _in_chunks(roots, chunk, engine.logits)
        seqs = [c for r in roots for c in engine.fork(r, branches, at=prefix)]
    else:
        seqs = [engine.add(t, seed=i) for i, t in enumerate(texts) for _ in range(branches)]
    _in_chunks(seqs, chunk, lambda s: engine.step(s, params))
    for _ in range(new_tokens - 1):
        engine.step(seqs, params)


def _in_chunks(seqs, chunk: int, fn) -> None:
    chunk = chunk or len(seqs)
    for i in range(0, len(seqs), chunk):
        fn(seqs[i : i + chunk])


# -- pytest-benchmark entry points ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model()


@pytest.mark.parametrize("peer", ["ours", "hf_generate"])
def test_generate(benchmark, model, peer):
    prompts = random_prompts(4, 32, model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    if peer == "ours":
        engine = Engine(model, num_blocks=256)
        fn = lambda: engine.generate(prompts, params)
    else:
        ids = torch.tensor(prompts)
        kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
        mask = torch.ones_like(ids)
        fn = lambda: model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, **kw)
    benchmark.group = "generate 4 x 32-token prompts, 16 new tokens, greedy, tiny Qwen2, CPU"
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["fork", "reprefill"])
def test_branching(benchmark, model, mode):
    texts = random_prompts(2, 128, model.config.vocab_size, seed=1)

    def fresh_engine():  # a new engine per round, built outside the timed call (as in ``branching``)
        return (Engine(model, num_blocks=256, cuda_graphs=False), mode, texts, 4, 128, 4, 0), {}

    benchmark.group = "branching 2 prompts x 4 branches after 128 tokens, 4 new tokens"
    benchmark.pedantic(_branch_rollout, setup=fresh_engine, rounds=5, warmup_rounds=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    add_output_args(parser)
    args = parser.parse_args()
    # One thread: on a small shared machine, intra-op threads cost more in syncs than they save
    # on these tiny matrices (both engines run under the same setting).
    torch.set_num_threads(1)
    model = tiny_model()
    batch, prompt_len, new = (4, 32, 16) if args.quick else (8, 64, 64)
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
    engine = Engine(model, num_blocks=1024)
    ours, peer = engine_generate_tps(engine, prompts, new), hf_generate_tps(model, prompts, new)
    section = Section(
        "Rollout engine",
        "Qwen2-shaped model (hidden 128, 4 layers, vocab 1024), fp32, random weights, one thread; HF "
        "`generate` (greedy, its default cache) on the same model object. Second table: ARPO "
        "branching, forking a shared prefix's paged KV against prefilling every branch's prefix again.",
    )
    t = section.table("workload", "arpo_fast (tokens/s)", "HF generate (tokens/s)", "arpo_fast / HF")
    t.formats.update({"arpo_fast (tokens/s)": "{:.0f}", "HF generate (tokens/s)": "{:.0f}"})
    t.formats["arpo_fast / HF"] = "{:.2f}x"
    t.add(f"{batch} x {prompt_len}-token prompts, {new} new tokens, greedy", ours, peer, ours / peer)
    P, Z, L, T = (2, 4, 128, 4) if args.quick else (4, 8, 512, 8)
    branching(model, 2, 2, 16, 2)  # warm-up
    r = branching(model, P, Z, L, T)
    b = section.table(
        f"branching: {P} prompts x {Z} branches after {L} tokens, {T} new tokens", "prefill tokens", "wall s"
    )
    b.formats["wall s"] = "{:.3f}"
    for mode in ("fork", "reprefill"):
        b.add(mode, r[mode]["prefill_tokens"], r[mode]["seconds"])
    tokens = r["reprefill"]["prefill_tokens"] / r["fork"]["prefill_tokens"]
    b.add("reprefill / fork", f"{tokens:.1f}x", f"{r['reprefill']['seconds'] / r['fork']['seconds']:.2f}x")
    emit(section, args)


if __name__ == "__main__":
    main()
