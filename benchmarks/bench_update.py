"""The tree-packed update against the per-trajectory one: tokens through the model, time, memory.

    python benchmarks/bench_update.py            # the figures recorded in RESULTS.md
    python benchmarks/bench_update.py --quick    # a short CPU run

1. Forward tokens on a synthetic ARPO step shaped like the reference's 7B reasoning runs: 128
   prompts of 1,536 tokens in mini-batches of 16, M/N/Z = 16/8/2, responses of 1-4k tokens with
   1-3 tool calls each (results of 64-512 tokens), forks right after tool results at about the rate
   the demo shows (5-11 branch points per 32 trajectories: each result branches with probability
   0.3 while its trajectory has a branch slot left; slots left over start fresh trajectories).
   Unpacked: every trajectory from its first token (also as today's micro-batches pad them).
   Packed: each tree once, big trees split at ``--micro-batch-tokens`` into groups that carry
   their other ancestors and share the prompt, run once for the tree (``packing.PromptContext``).
2. Update wall time on the CPU: a small Qwen2 on the same workload shrunk 8-fold (prompt 192,
   responses 128-512), packed against per trajectory, interleaved, median and best of repeats
   after a warm-up (on a shared machine the best is the steadier figure). The update's steps use
   SGD with lr 0, so every repeat sees the same model.
3. Peak memory of the packed update with and without activation checkpointing, each in a fresh
   process (peak resident set size over the one before the update), same model and workload.

The last line ends with ``ratio X``: packed / unpacked forward tokens in (1).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

from arpo_fast.rollout.responses import Response, assemble_tree
from arpo_fast.train.packing import build_trees, split_tree
from arpo_fast.train.padded import micro_batches
from arpo_fast.train.update import UpdateConfig, mini_batches


def arpo_workload(
    seed: int,
    prompts: int,
    prompt_len: int = 1536,
    response=(1024, 4096),
    result=(64, 512),
    calls=(1, 3),
    rollouts: int = 16,
    initial: int = 8,
    branch_p: float = 0.3,
    vocab: int = 151_936,
):
    """Trajectories and node sizes of an ARPO step (module docstring), shaped as ``arpo_rollout``
    returns them; the token ids are random. Returns (trajectories, node_tokens, branch points)."""
    rng = random.Random(seed)
    ids = itertools.count()
    trajs, node_tokens, branch_points = [], {}, 0
    for p in range(prompts):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        made = []
        for _ in range(initial):  # one branch slot each (M - N = N), as the tree splits them
            source = _Growing(rng, vocab, [], [], [next(ids)], 0, rng.uniform(*response), rng.randint(*calls))
            for _ in source.results(result):
                if not source.forked and rng.random() < branch_p:
                    made.append(source.fork(ids, node_tokens, rng.uniform(*response)))
                    branch_points += 1
            made.append(source)
        made += [
            _Growing(rng, vocab, [], [], [next(ids)], 0, rng.uniform(*response), rng.randint(*calls))
            for _ in range(rollouts - len(made))
        ]
        for g in made:
            for _ in g.results(result):  # copies and fills (a source is written already)
                pass
            node_tokens[g.path[-1]] = len(g.resp) - g.start
            trajs.append(Response(p, prompt, response_ids=g.resp, loss_mask=g.mask, path=g.path))
    return trajs, node_tokens, branch_points


class _Growing:
    """A trajectory being written: model segments, each call's result (loss mask 0) after it."""

    def __init__(self, rng, vocab, resp, mask, path, start, length, calls):
        self.rng, self.vocab = rng, vocab
        self.resp, self.mask, self.path, self.start = resp, mask, path, start
        self.length, self.calls, self.forked = max(int(length), len(resp) + 1), calls, False
        self.written = False

    def _write(self, n: int, mask: int) -> None:
        self.resp += [self.rng.randrange(self.vocab) for _ in range(n)]
        self.mask += [mask] * n

    def results(self, result):
        """Write up to the end; yield at the end of each tool result (a fork point)."""
        if self.written:
            return
        self.written = True
        while self.calls and self.length - len(self.resp) > 2 * result[1]:
            self.calls -= 1
            self._write(int((self.length - len(self.resp)) * self.rng.uniform(0.15, 0.4)), 1)
            self._write(self.rng.randint(*result), 0)
            yield len(self.resp)
        self._write(max(self.length - len(self.resp), 1), 1)

    def fork(self, ids, node_tokens, length) -> _Growing:
        at = len(self.resp)
        node_tokens[self.path[-1]] = at - self.start  # the open node up to here becomes shared
        shared = list(self.path)
        self.path.append(next(ids))
        self.start, self.forked = at, True
        copy = _Growing(
            self.rng,
            self.vocab,
            list(self.resp),
            list(self.mask),
            shared + [next(ids)],
            at,
            max(length, at + 1),
            self.rng.randint(0, self.calls),
        )
        copy.forked = True
        return copy


def forward_tokens(trajs, node_tokens, cfg: UpdateConfig) -> dict[str, int]:
    """Tokens each layout sends through the model (the grad pass of every mini-batch)."""
    unpacked = padded = packed = unique = 0
    record = assemble_tree(trajs, node_tokens)
    for share in mini_batches([t.prompt_index for t in trajs], cfg.mini_batch_prompts):
        lengths = [len(trajs[i].prompt_ids) + len(trajs[i].response_ids) for i in share]
        unpacked += sum(lengths)
        groups = micro_batches(lengths, cfg.micro_batch_tokens)
        padded += sum(len(g) * max(lengths[i] for i in g) for g in groups)
        for tree in build_trees(record, share):
            unique += tree.size
            pieces = split_tree(tree, cfg.micro_batch_tokens)
            context = pieces[0].context  # a split tree's prompt context runs once
            packed += sum(p.size for p in pieces) + (context.tokens if context is not None else 0)
    return dict(unpacked=unpacked, padded=padded, unique=unique, packed=packed)


def small_model(vocab: int = 2048):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    ).eval()


def shrunk_workload(prompts: int, seed: int = 1, vocab: int = 2048):
    trajs, node_tokens, _ = arpo_workload(
        seed, prompts, prompt_len=192, response=(128, 512), result=(8, 64), vocab=vocab
    )
    adv = [torch.randn(len(t.response_ids)) for t in trajs]
    return trajs, node_tokens, adv


def timed_update(model, trajs, node_tokens, adv, cfg: UpdateConfig) -> float:
    from arpo_fast.train.optim import MasterWeights
    from arpo_fast.train.update import UpdateData, update

    optimizer = MasterWeights(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.0))
    record = assemble_tree(trajs, node_tokens)
    start = time.perf_counter()
    update(model, optimizer, UpdateData(record, adv), cfg)
    return time.perf_counter() - start


def peak_rss(prompts: int, checkpointing: str, budget: int) -> float:
    """MiB the resident set of this process grows by while running one packed update."""
    model = small_model()
    trajs, node_tokens, adv = shrunk_workload(prompts)
    before = _high_water_kib()
    timed_update(
        model,
        trajs,
        node_tokens,
        adv,
        UpdateConfig(micro_batch_tokens=budget, gradient_checkpointing=checkpointing),
    )
    return (_high_water_kib() - before) / 1024


def _high_water_kib() -> int:
    """Peak resident set of this process (VmHWM: unlike ru_maxrss, not inherited from the parent
    across exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats")
    parser.add_argument(
        "--peak-rss", nargs=3, metavar=("PROMPTS", "CHECKPOINTING", "BUDGET"), help=argparse.SUPPRESS
    )  # one measurement, in the fresh process it runs in
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.peak_rss:
        prompts, checkpointing, budget = args.peak_rss
        print(peak_rss(int(prompts), checkpointing, int(budget)))
        return
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")

    prompts, repeats = (2, 1) if args.quick else (4, 5)
    budget = 2048
    model = small_model()
    trajs, node_tokens, adv = shrunk_workload(prompts)
    cfgs = {
        packed: UpdateConfig(packed_update=packed, micro_batch_tokens=budget, mini_batch_prompts=prompts)
        for packed in (True, False)
    }
    runs = {True: [], False: []}
    for r in range(repeats + 1):  # interleaved, so that load from elsewhere hits both alike
        for packed, cfg in cfgs.items():
            seconds = timed_update(model, trajs, node_tokens, adv, cfg)
            if r:  # the first round warms up
                runs[packed].append(seconds)
    times = {packed: statistics.median(r) for packed, r in runs.items()}
    best = {packed: min(r) for packed, r in runs.items()}
    shrunk = forward_tokens(trajs, node_tokens, cfgs[True])
    print(
        f"CPU update, Qwen2 {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{prompts} prompts "
        f"x 16 trajectories (prompt 192, responses 128-512), micro-batches of {budget} tokens, median of "
        f"{repeats} (best): packed {times[True]:.2f} s ({best[True]:.2f} s), per trajectory "
        f"{times[False]:.2f} s ({best[False]:.2f} s): {times[True] / times[False]:.2f}x "
        f"({best[True] / best[False]:.2f}x); forward tokens {shrunk['packed']} vs {shrunk['padded']} padded"
    )

    peak = {
        c: float(
            subprocess.run(
                [sys.executable, __file__, "--peak-rss", str(prompts), c, str(budget)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()[-1]
        )
        for c in ("false", "true")
    }
    print(
        f"peak memory of the packed update (resident set growth, fresh process): checkpointing off "
        f"{peak['false']:.0f} MiB, on {peak['true']:.0f} MiB"
    )

    steps = 2 if args.quick else 8
    trajs, node_tokens, branch_points = arpo_workload(0, 16 * steps)
    print(
        f"synthetic ARPO step: {16 * steps} prompts x 16 trajectories, "
        f"{branch_points / len(trajs) * 32:.1f} branch points per 32 trajectories"
    )
    default = UpdateConfig()
    for budget in sorted({default.micro_batch_tokens, 32768, 65536}, reverse=True):
        tokens = forward_tokens(trajs, node_tokens, UpdateConfig(micro_batch_tokens=budget))
        print(
            f"  micro-batches of {budget} tokens: unpacked {tokens['unpacked']} (padded {tokens['padded']}), "
            f"each tree once {tokens['unique']}, packed (split trees' context included) {tokens['packed']}: "
            f"{tokens['packed'] / tokens['unpacked']:.3f} of unpacked"
        )
    print(
        f"packed/unpacked forward tokens at the default --micro-batch-tokens {budget}: "
        f"ratio {tokens['packed'] / tokens['unpacked']:.3f}"
    )


if __name__ == "__main__":
    main()
