"""Rollout engine benchmarks on the CPU: generation throughput against HF ``generate``, and the
branching workload (fork after a shared prefix against re-prefilling every branch).

    python benchmarks/bench_engine.py            # prints the tables recorded in RESULTS.md
    python benchmarks/bench_engine.py --quick    # smaller sizes

The workload functions are shared with ``gpu_engine.py`` (same code, GPU sizes). Peers run in the
same process on the same model object: HF ``generate`` (greedy, its default dynamic cache), and for
branching a prefix-resubmitting rollout that prefills each branch's whole prefix again (what a
rollout that resubmits token lists pays without a prefix cache).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from arpo_fast.engine import Engine, SamplingParams
from arpo_fast.engine.random_model import random_causal_lm


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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
    _sync(engine.model.device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    _sync(engine.model.device)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def hf_generate_tps(model, prompts, new_tokens: int) -> float:
    """Generated tokens per second of HF ``generate`` (greedy, default cache) on equal-length prompts."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        model.generate(
            ids[:2, :8], max_new_tokens=2, **{**kw, "attention_mask": torch.ones_like(ids[:2, :8])}
        )
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        _sync(device)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - t0)


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
    params = SamplingParams(temperature=1.0)
    result = {}
    for mode in ("fork", "reprefill"):
        # Eager steps in both modes: the comparison is about prefill work, and a first graph
        # capture (the default on CUDA) would be charged to whichever mode decodes first.
        engine = Engine(model, block_size=block_size, num_blocks=num_blocks, cuda_graphs=False)
        _sync(engine.model.device)
        t0 = time.perf_counter()
        if mode == "fork":
            roots = [engine.add(t, seed=i) for i, t in enumerate(texts)]
            _in_chunks(roots, chunk, engine.logits)
            seqs = [c for r in roots for c in engine.fork(r, branches, at=prefix)]
        else:
            seqs = [engine.add(t, seed=i) for i, t in enumerate(texts) for _ in range(branches)]
        _in_chunks(seqs, chunk, lambda s, e=engine: e.step(s, params))
        for _ in range(new_tokens - 1):
            engine.step(seqs, params)
        _sync(engine.model.device)
        result[mode] = {"prefill_tokens": engine.stats["prefill_tokens"], "seconds": time.perf_counter() - t0}
        del engine, seqs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the pool back before the next engine sizes its own
    return result


def _in_chunks(seqs, chunk: int, fn) -> None:
    chunk = chunk or len(seqs)
    for i in range(0, len(seqs), chunk):
        fn(seqs[i : i + chunk])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    # One thread: on a small shared machine, intra-op threads cost more in syncs than they save
    # on these tiny matrices (both engines run under the same setting).
    torch.set_num_threads(1)
    model = tiny_model()
    batch, prompt_len, new = (4, 32, 16) if args.quick else (8, 64, 64)
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
    engine = Engine(model, num_blocks=1024)
    ours, peer = engine_generate_tps(engine, prompts, new), hf_generate_tps(model, prompts, new)
    print(
        f"model: Qwen2-shaped, hidden 128, 4 layers, vocab 1024, fp32, CPU, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| workload | ours (tokens/s) | HF generate (tokens/s) | ours / HF |\n|---|---|---|---|")
    print(
        f"| generate {batch} x {prompt_len}-token prompts, {new} new tokens, greedy | {ours:.0f} | "
        f"{peer:.0f} | {ours / peer:.2f}x |"
    )
    P, Z, L, T = (2, 4, 128, 4) if args.quick else (4, 8, 512, 8)
    branching(model, 2, 2, 16, 2)  # warm-up
    r = branching(model, P, Z, L, T)
    print(
        f"\n| branching: {P} prompts x {Z} branches after {L} tokens, {T} new tokens | prefill tokens "
        "| wall s |\n|---|---|---|"
    )
    for mode in ("fork", "reprefill"):
        print(f"| {mode} | {r[mode]['prefill_tokens']} | {r[mode]['seconds']:.3f} |")
    print(
        f"\nfork computes {r['reprefill']['prefill_tokens'] / r['fork']['prefill_tokens']:.1f}x fewer "
        f"prefill tokens and runs {r['reprefill']['seconds'] / r['fork']['seconds']:.2f}x faster"
    )


if __name__ == "__main__":
    main()
