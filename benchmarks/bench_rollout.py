"""Tool latency and the rollout: the asynchronous tree rollout against synchronous tool rounds.

    python benchmarks/bench_rollout.py            # the table recorded in RESULTS.md
    python benchmarks/bench_rollout.py --quick    # fewer prompts
    python -m pytest benchmarks/bench_rollout.py --benchmark-only   # the --quick sizes

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
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calculator import Calculator  # noqa: E402 - after sys.path is set
from harness import Section, add_output_args, emit, timed  # noqa: E402 - after sys.path is set

from arpo_fast.engine import Engine  # noqa: E402 - after sys.path is set
from arpo_fast.rollout import Protocol  # noqa: E402 - after sys.path is set
from arpo_fast.rollout.tools.executor import ExecutorConfig, ToolExecutor  # noqa: E402 - after sys.path is set
from arpo_fast.rollout.tree import ARPOConfig, arpo_rollout  # noqa: E402 - after sys.path is set
from arpo_fast.seeds import child_seed  # noqa: E402 - after sys.path is set
from arpo_fast.train.demo import demo_model, demo_problems, demo_tokenizer, warm_start  # noqa: E402 - after sys.path is set


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


@dataclass
class Workload:
    """The demo model (warm-started) in an engine, the protocol, prompts and sizes."""

    engine: Engine
    protocol: Protocol
    prompts: list[list[int]]
    n: int  # trajectories per prompt (no branching)
    max_tokens: int

    def rollout(self, schedule: str, executor) -> list[list[int]]:
        """Every trajectory's response ids under ``schedule`` ('async' or 'rounds'), seed 1."""
        if schedule == "async":
            cfg = ARPOConfig(rollouts=self.n, initial=self.n, max_response_tokens=self.max_tokens)
            out = arpo_rollout(self.engine, self.protocol, self.prompts, cfg, executor=executor, seed=1)
            return [t.response_ids for t in out.trajectories]
        return round_rollout(self.engine, self.protocol, self.prompts, self.n, self.max_tokens, executor, 1)


def setup(n_prompts: int, n: int, max_tokens: int, warm_steps: int = 300) -> Workload:
    tok = demo_tokenizer()
    model = demo_model(tok, seed=0)
    warm_start(model, tok, steps=warm_steps)
    engine = Engine(model.eval(), tokenizer=tok, num_blocks=4096)
    protocol = Protocol(tok, eos_token_ids=engine.eos_token_ids, available_tools=["python"])
    prompts = [tok.encode(row["prompt"]) for row in demo_problems(n_prompts, seed=7)]
    return Workload(engine, protocol, prompts, n, max_tokens)


def new_executor() -> ToolExecutor:
    return ToolExecutor({"python": Calculator(latency)}, ExecutorConfig(max_workers=64, dedup=False))


# -- pytest-benchmark entry points ---------------------------------------------------------------


@pytest.fixture(scope="module")
def workload():
    torch.set_num_threads(1)
    return setup(2, 4, 64)


@pytest.mark.parametrize("schedule", ["async", "rounds"])
def test_schedule(benchmark, workload, schedule):
    executors = []

    def fresh():  # a fresh executor per round, built outside the timing
        executors.append(new_executor())
        return (schedule, executors[-1]), {}

    benchmark.group = "demo model, 2 prompts x 4 trajectories of up to 64 tokens, 20/500 ms calls"
    with torch.no_grad():
        out = benchmark.pedantic(workload.rollout, setup=fresh, rounds=3, warmup_rounds=1)
    for ex in executors:
        ex.shutdown()
    assert len(out) == 8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    add_output_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_prompts, n, max_tokens = (2, 4, 64) if args.quick else (8, 8, 96)
    work = setup(n_prompts, n, max_tokens)
    results = {}
    with torch.no_grad():
        for schedule, name in (("async", "async (arpo_rollout)"), ("rounds", "rounds (reference schedule)")):
            executor = new_executor()
            out, seconds = timed(lambda ex=executor, s=schedule: work.rollout(s, ex))
            results[name] = (seconds, out, executor.stats.executed)
            executor.shutdown()
    (fast, ours, calls), (slow, theirs, _) = results.values()
    assert ours == theirs, "the two schedules wrote different tokens"
    tokens = sum(len(ids) for ids in ours)
    section = Section(
        "Rollout schedule under tool latency (short calls)",
        f"The demo model (warm-started), {n_prompts} prompts x {n} trajectories of up to {max_tokens} "
        f"tokens, {calls} tool calls (20 ms each, 500 ms for one call text in ten), branching off, one "
        f"thread; both schedules write the same tokens (checked). Asynchronous over rounds: "
        f"{slow / fast:.2f}x.",
    )
    t = section.table("schedule", "wall s", "response tokens/s", formats={"wall s": "{:.2f}"})
    t.formats["response tokens/s"] = "{:.0f}"
    for name, (seconds, _, _) in results.items():
        t.add(name, seconds, tokens / seconds)
    emit(section, args)


if __name__ == "__main__":
    main()
