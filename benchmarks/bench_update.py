"""The tree-packed update against the per-trajectory one: tokens through the model, time, memory.

    python benchmarks/bench_update.py            # the figures recorded in RESULTS.md
    python benchmarks/bench_update.py --quick    # a short CPU run
    python -m pytest benchmarks/bench_update.py --benchmark-only   # (2) at a small size

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
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Section, add_output_args, emit, interleave, timed  # noqa: E402 - after sys.path is set

from arpo_fast.rollout.responses import Response, assemble_tree  # noqa: E402 - after sys.path is set
from arpo_fast.train.packing import build_trees, split_tree  # noqa: E402 - after sys.path is set
from arpo_fast.train.padded import micro_batches  # noqa: E402 - after sys.path is set
from arpo_fast.train.update import UpdateConfig, mini_batches  # noqa: E402 - after sys.path is set


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
    return timed(lambda: update(model, optimizer, UpdateData(record, adv), cfg))[1]


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


# -- pytest-benchmark entry points ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["packed", "per_trajectory"])
def test_update(benchmark, layout):
    torch.set_num_threads(1)
    model = small_model()
    trajs, node_tokens, adv = shrunk_workload(1)
    cfg = UpdateConfig(packed_update=layout == "packed", micro_batch_tokens=2048, mini_batch_prompts=1)
    benchmark.group = "update, 1 prompt x 16 trajectories (prompt 192, responses 128-512), Qwen2 3.7M"
    benchmark.pedantic(timed_update, args=(model, trajs, node_tokens, adv, cfg), rounds=3, warmup_rounds=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats")
    parser.add_argument(
        "--peak-rss", nargs=3, metavar=("PROMPTS", "CHECKPOINTING", "BUDGET"), help=argparse.SUPPRESS
    )  # one measurement, in the fresh process it runs in
    add_output_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.peak_rss:
        prompts, checkpointing, budget = args.peak_rss
        print(peak_rss(int(prompts), checkpointing, int(budget)))
        return
    prompts, repeats = (2, 1) if args.quick else (4, 5)
    section = Section(
        "Tree-packed update",
        f"Update wall time: a Qwen2 of 3.7M parameters (hidden 256, 4 layers, vocab 2048, fp32) on "
        f"the synthetic ARPO step shrunk 8-fold ({prompts} prompts of 192 tokens x 16 trajectories, "
        f"responses 128-512), micro-batches of 2,048 tokens, one mini-batch, {repeats} interleaved "
        "repeats after a warm-up (median, best). Peak memory of the packed update, each in a fresh "
        "process (growth of the resident set's high-water mark). Forward tokens on the synthetic "
        "step shaped like the reference's 7B reasoning runs (module docstring).",
    )
    ratio = update_rows(section, prompts, repeats)
    emit(section, args)
    print(f"packed/unpacked forward tokens at the default --micro-batch-tokens: ratio {ratio:.3f}")


def update_rows(section: Section, prompts: int, repeats: int) -> float:
    """The three tables of the module docstring; returns (1)'s ratio at the default budget."""
    budget = 2048
    model = small_model()
    trajs, node_tokens, adv = shrunk_workload(prompts)
    cfgs = {
        layout: UpdateConfig(
            packed_update=layout == "packed", micro_batch_tokens=budget, mini_batch_prompts=prompts
        )
        for layout in ("packed", "per trajectory")
    }
    times = interleave(
        {name: (lambda c=cfg: timed_update(model, trajs, node_tokens, adv, c)) for name, cfg in cfgs.items()},
        warmup=1,
        reps=repeats,
    )
    shrunk = forward_tokens(trajs, node_tokens, cfgs["packed"])
    t = section.table("update", "median s", "best s", "forward tokens", formats={"median s": "{:.2f}"})
    t.formats["best s"] = "{:.2f}"
    t.add("packed", times["packed"].median, times["packed"].best, shrunk["packed"])
    t.add("per trajectory", times["per trajectory"].median, times["per trajectory"].best, shrunk["padded"])
    med, best = (
        times["packed"].median / times["per trajectory"].median,
        times["packed"].best / times["per trajectory"].best,
    )
    t.add(
        "packed / per trajectory", f"{med:.2f}x", f"{best:.2f}x", f"{shrunk['packed'] / shrunk['padded']:.2f}"
    )
    memory = section.table("activation checkpointing", "peak memory of the packed update (MiB)")
    for c in ("false", "true"):
        cmd = [sys.executable, __file__, "--peak-rss", str(prompts), c, str(budget)]
        peak = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
        memory.add("on" if c == "true" else "off", f"{peak:.0f}")
    return forward_rows(section, 2 if prompts < 4 else 8)


def forward_rows(section: Section, steps: int) -> float:
    trajs, node_tokens, branch_points = arpo_workload(0, 16 * steps)
    t = section.table(
        f"--micro-batch-tokens ({16 * steps} prompts x 16, {branch_points / len(trajs) * 32:.1f} "
        "branch points per 32 trajectories)",
        "unpacked (padded)",
        "each tree once",
        "packed (prompt contexts once)",
        "packed / unpacked",
        formats={"packed / unpacked": "{:.3f}"},
    )
    default = UpdateConfig()
    for budget in sorted({default.micro_batch_tokens, 32768, 65536}):
        tokens = forward_tokens(trajs, node_tokens, UpdateConfig(micro_batch_tokens=budget))
        name = f"{budget} (default)" if budget == default.micro_batch_tokens else str(budget)
        t.add(
            name,
            f"{tokens['unpacked']:,} ({tokens['padded']:,})",
            f"{tokens['unique']:,}",
            f"{tokens['packed']:,}",
            tokens["packed"] / tokens["unpacked"],
        )
        if budget == default.micro_batch_tokens:
            ratio = tokens["packed"] / tokens["unpacked"]
    return ratio


if __name__ == "__main__":
    main()
