"""The branch budget's consequences: branch points per prompt and copies of copies, simulated.

    python benchmarks/bench_branch_budget.py           # the table recorded in RESULTS.md
    python benchmarks/bench_branch_budget.py --quick   # fewer prompts

Every trajectory makes the same number of tool calls (1, 2 or 3) before it answers, and every
token has the same entropy (H a mean over its window, whatever the window's length), so dH = 0
and each branch draw wins with probability tau (the reference's default, 0.5) whichever rule
decides: the rules differ only in who may branch and how
often. M/N = 16/8, Z = 2 (the reference's) and Z = 3. Rows:

- ``ours, split``: ``arpo_rollout`` with its defaults (decide after the result; M - N slots split
  among the initial trajectories in advance, a copy sharing its source's).
- ``reference rule, split``: ``arpo_rollout --arpo-semantics reference --branch-budget split``.
- ``reference rule, pooled``: ``arpo_rollout --arpo-semantics reference`` (its default budget: one
  pool per prompt, granted in (call number, creation order) order).
- ``reference's rounds``: the reference implementation's loop simulated here (a pool per prompt
  granted in index order each synchronous round, one draw per copy, one fresh fill per round when
  no trajectory of the prompt is active); its own random draws, the same probabilities.

Counts are per prompt: branch points (a trajectory forking at a call), those whose source is itself
a copy ("of copies") or a fill ("of fills"), and trajectories in the end.
"""

from __future__ import annotations

import argparse
import random
from concurrent.futures import Future

import pytest
import torch

from arpo_fast.engine.runner import StepOutput
from arpo_fast.rollout import Protocol, ProtocolConfig
from arpo_fast.rollout.tree import ARPOConfig, arpo_rollout
from arpo_fast.train.demo import demo_tokenizer

CALL, ANSWER = "<python>print(1+1)</python>", "<answer>\\boxed{2}</answer>"


class ScriptedEngine:
    """Each sequence writes CALL ``calls`` times (a tool result after each), then ANSWER and EOS;
    every token has entropy 1."""

    def __init__(self, tok, calls: int):
        self.texts = [tok.encode(CALL), tok.encode(ANSWER) + [tok.eos_token_id]]
        self.eos, self.calls, self.vocab_size = tok.eos_token_id, calls, len(tok)
        self.seqs: dict[int, dict] = {}

    def _new(self, n: int, results: list[int]) -> int:
        self.seqs[len(self.seqs)] = {"n": n, "results": results, "start": n}
        return len(self.seqs) - 1

    def add(self, prompt, seed=0):
        return self._new(len(prompt), [len(prompt)])

    def extend(self, seq, ids):
        s = self.seqs[seq]
        s["n"] += len(ids)
        s["results"].append(s["n"])

    def fork(self, seq, n, at=None):
        s = self.seqs[seq]
        return [self._new(at, [r for r in s["results"] if r <= at]) for _ in range(n)]

    def free(self, seq):
        pass

    def step(self, seqs, params=None, top_entropy=None):
        tokens = []
        for seq in seqs:
            s = self.seqs[seq]
            done = len(s["results"]) - 1  # calls answered so far
            text = self.texts[0] if done < self.calls else self.texts[1]
            i = s["n"] - s["results"][-1]
            tokens.append(text[i] if i < len(text) else self.eos)
            s["n"] += 1
        n = len(seqs)
        ones = torch.ones(n)
        return StepOutput(torch.tensor(tokens), -ones, ones, torch.ones(n, dtype=torch.bool), ones)


class Tools:
    def submit(self, name, query):
        future = Future()
        future.set_result("2")
        return future


def _counts(tree, prompts: int) -> dict[str, float]:
    trajs = tree.trajectories
    points = {(t.parent, tuple(t.path[:-1])) for t in trajs if t.kind == "branch"}
    return {
        "branch points": len(points) / prompts,
        "of copies": sum(trajs[s].kind == "branch" for s, _ in points) / prompts,
        "of fills": sum(trajs[s].kind == "fill" for s, _ in points) / prompts,
        "trajectories": len(trajs) / prompts,
    }


def ours(tok, calls: int, prompts: int, branches: int, **cfg) -> dict[str, float]:
    protocol = Protocol(
        tok, ProtocolConfig(max_calls=calls, stop_at_answer=True), eos_token_ids=[tok.eos_token_id]
    )
    # the mean over a window: windows of any length have the same entropy, so dH = 0
    config = ARPOConfig(
        rollouts=16, initial=8, branches=branches, threshold=0.5, entropy_reduce="mean", **cfg
    )
    ids = [tok.encode(f"Q{p}\n") for p in range(prompts)]
    tree = arpo_rollout(ScriptedEngine(tok, calls), protocol, ids, config, executor=Tools(), seed=1)
    return _counts(tree, prompts)


def reference_rounds(calls: int, prompts: int, branches: int, seed: int = 0) -> dict[str, float]:
    """The reference's synchronous loop for one prompt at a time (prompts do not share a pool)."""
    rng = random.Random(seed)
    totals = dict.fromkeys(("branch points", "of copies", "of fills", "trajectories"), 0.0)
    for _ in range(prompts):
        left = [calls] * 8  # calls still to make, by index
        kind = ["initial"] * 8
        active = list(range(8))
        while active:
            called = [i for i in active if left[i] > 0]  # the others answer and end
            for i in called:
                left[i] -= 1
            new = []
            for i in called:  # index order; one pool
                slots = 16 - len(left) - len(new)
                if slots <= 0:
                    break
                made = sum(rng.random() <= 0.5 for _ in range(min(branches - 1, slots)))
                if made:
                    totals["branch points"] += 1
                    totals["of copies"] += kind[i] == "branch"
                    totals["of fills"] += kind[i] == "fill"
                new += [("branch", left[i])] * made
            if not called and len(left) < 16:  # no trajectory active: one fresh fill
                new.append(("fill", calls))
            for k, calls_left in new:
                kind.append(k)
                left.append(calls_left)
            active = called + list(range(len(left) - len(new), len(left)))
        totals["trajectories"] += len(left)
    return {k: v / prompts for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 prompts")
    parser.add_argument("--prompts", type=int, default=500)
    args = parser.parse_args()
    prompts = 100 if args.quick else args.prompts
    tok = demo_tokenizer()
    rows = {
        "ours, split": lambda c, z: ours(tok, c, prompts, z),
        "reference rule, split": lambda c, z: ours(
            tok, c, prompts, z, arpo_semantics="reference", branch_budget="split"
        ),
        "reference rule, pooled": lambda c, z: ours(tok, c, prompts, z, arpo_semantics="reference"),
        "reference's rounds": lambda c, z: reference_rounds(c, prompts, z),
    }
    print(f"{prompts} prompts, M/N = 16/8, tau 0.5, dH = 0; per prompt: branch points (of copies, of fills)")
    print("| Z | rule | 1 call | 2 calls | 3 calls |")
    print("|---|---|---|---|---|")
    for z in (2, 3):
        for name, run in rows.items():
            cells = []
            for calls in (1, 2, 3):
                c = run(calls, z)
                assert c["trajectories"] == 16, f"{name}: {c['trajectories']} trajectories per prompt"
                cells.append(f"{c['branch points']:.2f} ({c['of copies']:.2f}, {c['of fills']:.2f})")
            print(f"| {z} | {name} | " + " | ".join(cells) + " |", flush=True)


# -- pytest-benchmark entry point ----------------------------------------------------------------


@pytest.mark.parametrize("budget", ["split", "pooled"])
def test_branch_budget(benchmark, budget):
    """The rollout of 20 prompts x 16 trajectories with 2 calls each under each branch budget (the
    reference's rule for pooled), on the scripted engine; the branch points go into extra_info."""
    tok = demo_tokenizer()
    rule = {"arpo_semantics": "reference"} if budget == "pooled" else {}
    benchmark.group = "scripted ARPO rollout, 20 prompts x 16 trajectories, 2 calls each"
    counts = benchmark.pedantic(lambda: ours(tok, 2, 20, 2, branch_budget=budget, **rule), rounds=1)
    benchmark.extra_info.update(counts)


if __name__ == "__main__":
    main()
