"""Tool latency and the rollout: the asynchronous tree rollout against synchronous tool rounds.

    python benchmarks/bench_rollout.py            # the table recorded in RESULTS.md
    python benchmarks/bench_rollout.py --quick    # fewer prompts

The reference implementation runs tools in global rounds: every sequence decodes to its next call,
then the round's calls run together and the next round waits for the slowest. ``arpo_rollout``
lets each trajectory wait only for its own call while the others keep decoding. Both run here on
the same engine, model (the demo model after its warm start), seeds and tool, with branching off
(rollouts = initial), so they write the same tokens (checked); only the waiting differs. The tool
evaluates the arithmetic and takes a latency fixed per call text: most calls 20 ms, one in ten
500 ms (the heavy tail of search requests or slow code).
"""

from __future__ import annotations

import argparse
import time
import zlib

import torch
from calculator import Calculator

from arpo_fast.engine import Engine
from arpo_fast.rollout import Protocol
from arpo_fast.rollout.tools.executor import ExecutorConfig, ToolExecutor
from arpo_fast.rollout.tree import ARPOConfig, arpo_rollout
from arpo_fast.seeds import child_seed
from arpo_fast.train.demo import demo_model, demo_problems, demo_tokenizer, warm_start


def latency(query: str) -> float:
    """Seconds the tool takes for a call: fixed per call text, 0.5 s for one text in ten, else 20 ms."""
    return 0.5 if zlib.crc32(query.encode()) % 10 == 0 else 0.02


def round_rollout(engine, protocol, prompts, n: int, max_tokens: int, executor, seed: int):
    """The reference's schedule on our engine: decode every open trajectory to its next stop, run
    the round's calls together, wait for all of them, repeat. Same seeds as ``arpo_rollout``."""
    trajs = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            key = child_seed(child_seed(seed, p), j)
            trajs.append({"seq": engine.add(prompt, key), "proto": protocol.new_trajectory(), "ids": []})
    open_ = list(trajs)
    while open_:
        decoding, calls = list(open_), {}
        while decoding:
            out = engine.step([t["seq"] for t in decoding])
            still = []
            for t, token in zip(decoding, out.tokens.tolist()):
                t["ids"].append(token)
                event = t["proto"].feed(token)
                if event is None and len(t["ids"]) < max_tokens:
                    still.append(t)
                elif event is not None and event.kind == "call" and len(t["ids"]) < max_tokens:
                    calls[id(t)] = (t, event.call)
            decoding = still
        futures = [(t, executor.submit(c.name, c.body) if c.ok else None, c) for t, c in calls.values()]
        open_ = []
        for t, future, call in futures:  # the round ends with its slowest call
            ids = t["proto"].result_ids(future.result().text if future else call.error)
            ids = ids[: max_tokens - len(t["ids"])]
            t["ids"] += ids
            if len(t["ids"]) < max_tokens:
                engine.extend(t["seq"], ids)
                open_.append(t)
    for t in trajs:
        engine.free(t["seq"])
    return [t["ids"] for t in trajs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = demo_tokenizer()
    model = demo_model(tok, seed=0)
    warm_start(model, tok, steps=300)
    engine = Engine(model.eval(), tokenizer=tok, num_blocks=4096)
    protocol = Protocol(tok, eos_token_ids=engine.eos_token_ids, available_tools=["python"])
    n_prompts, n, max_tokens = (2, 4, 64) if args.quick else (8, 8, 96)
    prompts = [tok.encode(row["prompt"]) for row in demo_problems(n_prompts, seed=7)]
    cfg = ARPOConfig(rollouts=n, initial=n, max_response_tokens=max_tokens)
    results = {}
    with torch.no_grad():
        for name in ("async (arpo_rollout)", "rounds (reference schedule)"):
            executor = ToolExecutor(
                {"python": Calculator(latency)}, ExecutorConfig(max_workers=64, dedup=False)
            )
            start = time.perf_counter()
            if name.startswith("async"):
                out = [
                    t.response_ids
                    for t in arpo_rollout(
                        engine, protocol, prompts, cfg, executor=executor, seed=1
                    ).trajectories
                ]
            else:
                out = round_rollout(engine, protocol, prompts, n, max_tokens, executor, seed=1)
            results[name] = (time.perf_counter() - start, out, executor.stats.executed)
            executor.shutdown()
    (fast, ours, calls), (slow, theirs, _) = results.values()
    assert ours == theirs, "the two schedules wrote different tokens"
    tokens = sum(len(ids) for ids in ours)
    print(
        f"demo model (warm-started), {n_prompts} prompts x {n} trajectories, up to {max_tokens} tokens, "
        f"{calls} tool calls (20 ms, or 500 ms for one call text in ten), CPU, 1 thread\n"
    )
    print("| schedule | wall s | response tokens/s |\n|---|---|---|")
    for name, (seconds, _, _) in results.items():
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:.0f} |")
    print(f"\nsame tokens; the asynchronous rollout is {slow / fast:.2f}x faster")


if __name__ == "__main__":
    main()
