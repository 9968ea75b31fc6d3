"""The asynchronous tree rollout against the reference's synchronous rounds, under tool latency.

    python benchmarks/bench_schedule.py            # 32 prompts x 16 trajectories
    python benchmarks/bench_schedule.py --quick    # 8 prompts (RESULTS.md); prints "ratio X" last
    python -m pytest benchmarks/bench_schedule.py --benchmark-only   # 2 prompts, latencies x 0.1

Workload: ARPO trees (M/N/Z = 16/8/2, the default branch rule) on a tiny Qwen2 (3 layers, hidden
128, the demo's tokenizer, random weights, fp32, one CPU thread). Every trajectory makes 1-4 calls,
search and python mixed; the tokens come from a seeded script run through the paged engine's real
forward and sampler (``scripted.py`` says why and how). Tools sleep for a latency drawn per call
from named distributions (``scripted.LATENCY``: search lognormal, median 1 s, p99 8 s; python
median 0.2 s, p99 3 s), a function of the call's text, so both schedules see the same latencies.

Schedules, both ``arpo_rollout`` on the same engine, executor settings and seeds:

* async (ours): a trajectory waits only for its own call; the others keep decoding.
* rounds (the reference's ``vLLMRolloutWithTools``): every live sequence decodes until it stops at
  a call or ends; then the round's calls run together (on the same thread pool) and the next round
  starts when the slowest has answered. Here a barrier between the rollout and the executor
  imposes it (:class:`Rounds`): a call is held until every live sequence is held or finished.

Both must give the same trees (tokens, masks, paths, branch structure, finish reasons): a tree is a
function of (seed, prompt, tool outputs), never of latency. Checked; log-probs and entropies agree
to float rounding (the batches differ, so the model's arithmetic may too).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Section, add_output_args, emit  # noqa: E402 - after sys.path is set
from scripted import LATENCY, ScriptedPolicy, SleepingTool  # noqa: E402 - after sys.path is set

from arpo_fast.engine import Engine  # noqa: E402 - after sys.path is set
from arpo_fast.engine.random_model import random_causal_lm  # noqa: E402 - after sys.path is set
from arpo_fast.rollout import Protocol, ProtocolConfig  # noqa: E402 - after sys.path is set
from arpo_fast.rollout.tools.executor import ExecutorConfig, ToolExecutor  # noqa: E402 - after sys.path is set
from arpo_fast.rollout.tree import ARPOConfig, arpo_rollout  # noqa: E402 - after sys.path is set
from arpo_fast.train.demo import demo_tokenizer  # noqa: E402 - after sys.path is set


def tree_rollout(engine, protocol, prompts, config, executor, seed):
    """The one call into the rollout's API: the trees as comparable values (per trajectory: prompt,
    kind, parent, path, tokens, mask, calls, finish), the node sizes, the float columns, counters."""
    out = arpo_rollout(engine, protocol, prompts, config, executor=executor, seed=seed)
    trees = [
        (t.prompt_index, t.kind, t.parent, tuple(t.path), tuple(t.response_ids), tuple(t.loss_mask))
        + (t.tool_calls, t.finish_reason)
        for t in out.trajectories
    ]
    floats = [(t.logprobs, t.entropies) for t in out.trajectories]
    return trees, dict(out.node_tokens), floats, dict(out.stats)


class Rounds:
    """The reference's schedule imposed on ``arpo_rollout``: an engine and executor in front of the
    real ones. A submitted call is held; when every live sequence is held (or has ended), the
    round's calls go to the executor together and the rollout waits for all of them (the barrier),
    then the held futures resolve at once and decoding resumes."""

    def __init__(self, engine, executor):
        self.engine, self.executor = engine, executor
        self.live, self.held, self.rounds, self.calls_per_round = 0, [], 0, []

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def add(self, prompt_ids, seed: int = 0) -> int:
        self.live += 1
        return self.engine.add(prompt_ids, seed)

    def fork(self, seq, n, at=None):
        children = self.engine.fork(seq, n, at)
        self.live += len(children)
        return children

    def free(self, seq) -> None:
        self.engine.free(seq)
        self.live -= 1
        self._barrier()

    def step(self, seqs, params=None, top_entropy=None):
        return self.engine.step(seqs, params, top_entropy)

    def extend(self, seq, token_ids) -> None:
        self.engine.extend(seq, token_ids)

    def submit(self, name: str, query: str) -> Future:
        held: Future = Future()
        self.held.append((name, query, held))
        self._barrier()
        return held

    def _barrier(self) -> None:
        if not self.held or len(self.held) < self.live:
            return
        batch, self.held = self.held, []
        futures = [self.executor.submit(name, query) for name, query, _ in batch]
        results = [f.result() for f in futures]  # the round ends with its slowest call
        for (_, _, held), result in zip(batch, results):
            held.set_result(result)
        self.rounds += 1
        self.calls_per_round.append(len(batch))


def tiny_model(vocab: int, eos: int):
    return random_causal_lm(
        "qwen2",
        vocab=vocab,
        hidden=128,
        layers=3,
        heads=4,
        kv_heads=2,
        intermediate=384,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=eos,
    )


def run(schedule: str, engine, tok, prompts, config, workers: int, scale: float, seed: int) -> dict:
    """One rollout of ``prompts`` under ``schedule`` ('async' or 'rounds'), with fresh tools."""
    tools = {name: SleepingTool(name, seed, scale) for name in LATENCY}
    executor = ToolExecutor(tools, ExecutorConfig(max_workers=workers, dedup=False))
    policy = ScriptedPolicy(engine, tok, prompts)
    protocol = Protocol(tok, ProtocolConfig(max_calls=4), eos_token_ids=engine.eos_token_ids)
    front = Rounds(policy, executor) if schedule == "rounds" else None
    start = time.perf_counter()
    policy.start = start
    with torch.no_grad():
        trees, nodes, floats, stats = tree_rollout(
            front or policy, protocol, prompts, config, front or executor, seed
        )
    wall = time.perf_counter() - start
    executor.shutdown()
    intervals = [iv for tool in tools.values() for iv in tool.intervals]
    return {
        "trees": trees,
        "nodes": nodes,
        "floats": floats,
        "stats": stats,
        "wall": wall,
        "engine_s": policy.busy_s,
        "engine_steps": policy.steps,
        "forwards": policy.forwards,
        "tool_busy": _union(intervals, start) / wall,
        "in_flight": sum(b - a for a, b in intervals) / wall,
        "calls": len(intervals),
        "done_at": policy.done_at,
        "rounds": front.rounds if front else None,
    }


def _union(intervals, start: float) -> float:
    """Seconds during which at least one interval is open."""
    total, end = 0.0, start
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def float_gap(a, b) -> float:
    """Largest |difference| of log-probs and entropies between two runs of the same trees."""
    gap = 0.0
    for (lp_a, h_a), (lp_b, h_b) in zip(a, b):
        for x, y in zip(lp_a + h_a, lp_b + h_b):
            if not (math.isnan(x) and math.isnan(y)):
                gap = max(gap, abs(x - y))
    return gap


def quantile(values, q: float) -> float:
    """The q-quantile (0 < q < 1) of ``values``, interpolated."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def setup(n_prompts: int):
    """Tokenizer, engine (a pool for every trajectory), prompts and tree settings."""
    tok = demo_tokenizer()
    model = tiny_model(len(tok), tok.eos_token_id).eval()
    engine = Engine(model, tokenizer=tok, num_blocks=n_prompts * 16 * 48)
    prompts = [tok.encode(f"Question {p}: look it up and compute it.\n") for p in range(n_prompts)]
    return tok, engine, prompts, ARPOConfig(rollouts=16, initial=8, branches=2, max_response_tokens=1024)


@pytest.fixture(scope="module")
def workload():
    torch.set_num_threads(1)
    return setup(2)


@pytest.mark.parametrize("schedule", ["async", "rounds"])
def test_schedule(benchmark, workload, schedule):
    tok, engine, prompts, config = workload
    benchmark.group = "ARPO rollout, 2 prompts x 16 trajectories, tool latencies x 0.1"
    out = benchmark.pedantic(run, args=(schedule, engine, tok, prompts, config, 64, 0.1, 0), rounds=2)
    assert len(out["trees"]) == 32


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8 prompts instead of 32")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (default 32, --quick 8)")
    parser.add_argument(
        "--tool-workers", type=int, default=64, help="the executor's threads (the reference's: 64)"
    )
    parser.add_argument(
        "--latency-scale", type=float, default=1.0, help="multiply every tool latency (1: as named)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_output_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_prompts = args.prompts or (8 if args.quick else 32)
    section = Section("Rollout schedule under realistic tool latency", "")  # context: from the figures
    tok, engine, prompts, config = setup(n_prompts)
    run("async", engine, tok, prompts[:1], config, args.tool_workers, 0.0, args.seed + 1)  # warm-up
    results = {
        s: run(s, engine, tok, prompts, config, args.tool_workers, args.latency_scale, args.seed)
        for s in ("async", "rounds")
    }
    ours, ref = results["async"], results["rounds"]
    same = ours["trees"] == ref["trees"] and ours["nodes"] == ref["nodes"]
    report(section, results, same, float_gap(ours["floats"], ref["floats"]), n_prompts, args)
    emit(section, args)
    print(f"same trees: {'yes' if same else 'NO'}")
    print(f"ratio {ref['wall'] / ours['wall']:.2f}")
    return 0 if same else 1


def report(section: Section, results: dict, same: bool, gap: float, n_prompts: int, args) -> None:
    ours, ref = results["async"], results["rounds"]
    stats = ours["stats"]
    trajectories = len(ours["trees"])
    section.context = (
        f"{n_prompts} prompts x 16 trajectories (M/N/Z 16/8/2): {trajectories} trajectories, "
        f"{stats['branch_points']} branch points, {stats['fills']} fills, {ours['calls']} tool calls "
        f"(a branch shares its prefix's), {stats['model_tokens']} model and {stats['tool_tokens']} "
        f"tool-result tokens; tiny Qwen2 (3 layers, hidden 128, fp32, 1 thread) with scripted tokens; "
        f"tools sleep per call: search lognormal median 1 s p99 8 s, python median 0.2 s p99 3 s"
        f"{'' if args.latency_scale == 1 else f' (x {args.latency_scale})'}; {args.tool_workers} tool "
        f"threads. Same trees under both schedules: {'yes' if same else 'NO'} (log-probs and "
        f"entropies within {gap:.1e}). The rounds run {ref['rounds']} barriers."
    )
    t = section.table(
        "schedule",
        "wall s",
        "engine busy",
        "tool busy",
        "calls in flight (mean)",
        "engine steps (forwards)",
        "prompts done by (s): p10",
        "p50",
        "p90",
        "last",
    )
    names = {"async": "async (arpo_rollout)", "rounds": "rounds (reference schedule)"}
    for name, r in results.items():
        done = r["done_at"]
        t.add(
            names[name],
            f"{r['wall']:.1f}",
            f"{r['engine_s'] / r['wall']:.0%}",
            f"{r['tool_busy']:.0%}",
            f"{r['in_flight']:.1f}",
            f"{r['engine_steps']} ({r['forwards']})",
            *(f"{quantile(done, q):.1f}" for q in (0.1, 0.5, 0.9)),
            f"{max(done):.1f}",
        )
    t.add("rounds / async", f"{ref['wall'] / ours['wall']:.2f}x", *[""] * 8)


if __name__ == "__main__":
    sys.exit(main())
