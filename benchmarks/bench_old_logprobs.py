"""Update time of a step with the sampler's log-probs as the old policy (``--old-logprobs rollout``)
against the trainer's recomputation (``recompute``), which first runs a no-grad forward over every
mini-batch but the first.

    python benchmarks/bench_old_logprobs.py            # the figures recorded in RESULTS.md
    python benchmarks/bench_old_logprobs.py --quick    # a short CPU run

The workload is ``bench_update.py``'s shrunk ARPO step (a 4-layer Qwen2 of hidden 256, prompts of
192 tokens, responses of 128-512 with tool results, 16 trajectories per prompt), packed update, SGD
with lr 0 so that every repeat sees the same model; the two modes interleaved, median and best of
the repeats after a warm-up. The last line ends with ``ratio X``: rollout / recompute, median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_update import shrunk_workload, small_model, timed_update  # noqa: E402 - after sys.path is set

from arpo_fast.train.update_config import UpdateConfig  # noqa: E402 - after sys.path is set


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats")
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the step")
    parser.add_argument("--mini-batch-prompts", type=int, default=2, help="prompts per optimizer step")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per mode, after a warm-up")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    prompts, repeats = (2, 1) if args.quick else (args.prompts, args.repeats)
    per = 1 if args.quick else args.mini_batch_prompts
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    model = small_model()
    trajs, node_tokens, adv = shrunk_workload(prompts)
    cfgs = {
        mode: UpdateConfig(old_logprobs=mode, micro_batch_tokens=2048, mini_batch_prompts=per)
        for mode in ("recompute", "rollout")
    }
    runs: dict[str, list[float]] = {mode: [] for mode in cfgs}
    for r in range(repeats + 1):  # interleaved, so that load from elsewhere hits both alike
        for mode, cfg in cfgs.items():
            seconds = timed_update(model, trajs, node_tokens, adv, cfg)
            if r:  # the first round warms up
                runs[mode].append(seconds)
    median = {mode: statistics.median(t) for mode, t in runs.items()}
    best = {mode: min(t) for mode, t in runs.items()}
    steps = -(-prompts // per)
    print(
        f"CPU update, {prompts} prompts x 16 trajectories in {steps} mini-batches of {per}, "
        f"{torch.get_num_threads()} thread(s), median of {repeats} (best): recompute "
        f"{median['recompute']:.2f} s ({best['recompute']:.2f} s), rollout {median['rollout']:.2f} s "
        f"({best['rollout']:.2f} s); best ratio {best['rollout'] / best['recompute']:.2f}, "
        f"ratio {median['rollout'] / median['recompute']:.2f}"
    )


# -- pytest-benchmark entry point ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["recompute", "rollout"])
def test_update_old_logprobs(benchmark, mode):
    """One update of 2 prompts x 16 trajectories in 2 mini-batches with each kind of old log-probs;
    compare the two with --benchmark-compare or in one run's table."""
    model = small_model()
    trajs, node_tokens, adv = shrunk_workload(2)
    cfg = UpdateConfig(old_logprobs=mode, micro_batch_tokens=2048, mini_batch_prompts=1)
    benchmark.group = "update, 2 prompts x 16 trajectories in 2 mini-batches, CPU"
    benchmark.pedantic(lambda: timed_update(model, trajs, node_tokens, adv, cfg), rounds=2, warmup_rounds=1)


if __name__ == "__main__":
    main()
