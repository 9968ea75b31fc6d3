"""Train a tool-using agent with ARPO. ``python -m arpo_fast.train --help`` lists every setting.

Each step: pick ``prompts_per_step`` prompts; roll each out as an ARPO tree of ``rollouts``
trajectories on the paged-KV engine (``rollout/tree.py``); score every trajectory
(``rollout/rewards.py``); turn rewards into GRPO advantages within each prompt's group and attribute
them to tokens, soft or hard (``algo/advantages.py``); apply the clipped policy-gradient update,
token-mean over the model-written tokens (``update.py``, ``algo/loss.py``); log; save a checkpoint.
The run's state (model, engine, tools, optimizer) is a :class:`Run`, built once by ``setup``
(``run_state.py``).
Dropout stays off (the model is in eval mode), so the rollout and the update see the same policy.

One process (``python -m arpo_fast.train``): the engine runs on the trained model's own weights,
and AdamW steps fp32 master weights written back into them in place (``optim.py``), so a bf16 model
keeps the reference's 1e-6 updates. Under ``torchrun`` (``distributed.py``): each rank rolls out
its share of the prompts on a full copy of the weights, and the update is FSDP2-sharded.

Without arguments this is the built-in demo (``demo.py``): a tiny model, warm-started to call python
now and then, learns to call it on multiplications too large for it, in minutes on a CPU; held-out
evaluations (``eval.py``) and the run's plot and summary (``report.py``) show it. A real run:
``--model DIR --data FILE --max-response-tokens 4096``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Union

import torch

from arpo_fast.algo import group_advantages, tree_advantages
from arpo_fast.engine import SamplingParams
from arpo_fast.rollout import RewardConfig, compute_reward
from arpo_fast.rollout.rewards import response_text
from arpo_fast.rollout.rollout_tree import RolloutTree
from arpo_fast.rollout.tree import arpo_rollout
from arpo_fast.seeds import child_seed
from arpo_fast.train import (
    distributed,
    interrupts,
    lora_run,
    metrics,
    plan_cli,
    report,
    run_dir,
    sharded_policy,
)
from arpo_fast.train.checkpoint import CheckpointError, find_checkpoint
from arpo_fast.train.cli import parse_config
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.data import step_batch
from arpo_fast.train.distributed import AgreedError, describe_error
from arpo_fast.train.eval import evaluate_run
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.run_state import Run, checkpointer, setup
from arpo_fast.train.update import UpdateData, numbered_mini_batches, update

__all__ = ["Run", "fit", "main", "score", "setup", "train", "train_step"]

log = logging.getLogger("arpo_fast.train")


def score(trajectories, examples, tokenizer, rewards: RewardConfig) -> list:
    """The reward of each trajectory, chosen by its example's ``data_source``, on what the model
    wrote (special tokens skipped, tool results opaque: ``rollout.rewards.response_text``)."""
    return [
        compute_reward(
            examples[t.prompt_index].data_source,
            response_text(tokenizer, t.response_ids, t.loss_mask),
            examples[t.prompt_index].ground_truth,
            rewards,
        )
        for t in trajectories
    ]


def train_step(run: Run, step: int) -> dict:
    """One step (0-based): rollout -> reward -> advantage -> update; returns its metrics."""
    cfg, d = run.cfg, run.dist
    assert cfg.prompts_per_step is not None, "resolve_auto gives --prompts-per-step its value"
    order = step_batch(len(run.examples), cfg.prompts_per_step, step, cfg.seed)
    mine = d.mine(len(order)) if d else list(range(len(order)))  # positions in the step's prompts
    batch = [run.examples[order[j]] for j in mine]
    interrupts.enter_rollout(d)  # a signal from here to leave_rollout abandons the step at once
    t0 = time.perf_counter()
    run.residency.rollout()
    rollout = _roll_out(run, step, [e.prompt_ids for e in batch], mine)
    t1 = time.perf_counter()
    rewards = score(rollout.trajectories, batch, run.tokenizer, run.rewards)
    seq_adv = group_advantages([r.score for r in rewards], [t.prompt_index for t in rollout.trajectories])
    advantages = tree_advantages(seq_adv, rollout, cfg.advantage)
    t2 = time.perf_counter()
    interrupts.leave_rollout(d)  # every rank waits here for the slowest rollout, and stops if any does
    data = _update_data(run, rollout, advantages, mine)
    run.residency.update()
    lora_run.seed_dropout(run.scorer, cfg, step, d.rank if d else 0)  # masks a resume draws again
    update_metrics = update(run.scorer, run.optimizer, data, cfg.update, kl_model=run.kl_model, dist=d)
    t3 = time.perf_counter()
    device = next(run.scorer.parameters()).device
    extra = {"attn_implementation": cfg.update.resolved(device)[0], "lr": _learning_rate(run.optimizer)}
    if d is not None:  # the rollout copy catches up once, after the step's last optimizer step
        assert isinstance(run.optimizer, sharded_policy.ShardedPolicy), "torchrun: setup shards the policy"
        extra |= run.optimizer.sync_rollout()
    times = {"rollout": t1 - t0, "reward": t2 - t1, "update": t3 - t2}
    return metrics.step_row(step + 1, metrics.rollout_sums(rollout, rewards), update_metrics, times, d, extra)


def _roll_out(run: Run, step: int, prompts: list, mine: list[int]) -> RolloutTree:
    """This rank's prompts as ARPO trees; a prompt's tree depends on (seed, step, its position in
    the step's prompts) only."""
    cfg = run.cfg
    sampling = SamplingParams(cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    step_seed = child_seed(cfg.seed, step)
    with torch.no_grad():
        rollout = arpo_rollout(
            run.engine,
            run.protocol,
            prompts,
            cfg.rollout,
            sampling,
            run.executor,
            seed=step_seed,
            prompt_seeds=[child_seed(step_seed, j) for j in mine],
        )
    if run.executor is not None:
        run.executor.new_step()
    return rollout


def _update_data(run: Run, rollout: RolloutTree, advantages: list, mine: list[int]) -> UpdateData:
    """What the update trains on; mini-batches are numbered over the whole step's prompts, the
    same on every rank."""
    cfg = run.cfg
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    per, prompts = cfg.update.mini_batch_prompts, cfg.prompts_per_step
    assert per is not None and prompts is not None, "resolve_auto gives both their values"
    groups = numbered_mini_batches(
        [mine[t.prompt_index] // per for t in rollout.trajectories], math.ceil(prompts / per)
    )
    return UpdateData(
        rollout, advantages, pad_id, cfg.temperature, groups, run.engine.vocab_limit, positions=mine
    )


def _learning_rate(optimizer: Union[MasterWeights, sharded_policy.ShardedPolicy]) -> float:
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer.optimizer
    return inner.param_groups[0]["lr"]


def train(cfg: TrainConfig, model=None, tokenizer=None) -> list[dict]:
    """Set up (see :func:`setup`) and run the training loop; returns each step's metrics."""
    return fit(setup(cfg, model, tokenizer))


def _train_step_or_stop(run: Run, step: int) -> Optional[dict]:
    """:func:`train_step`, or None when a signal (to any rank) stopped the run before the step was
    complete; then ``interrupts.stopping()`` is the signal."""
    try:
        return train_step(run, step)
    except interrupts.RolloutAbandoned:
        interrupts.abandoned(run.dist)
        return None
    except interrupts.StepAbandoned:
        return None


def fit(run: Run) -> list[dict]:
    """Steps from ``run.start`` to ``cfg.steps``; each one's metrics are shown, appended to
    ``out/metrics.jsonl`` and returned; held-out evaluations at step 0, every ``eval_every`` steps
    and after the last (``report.py``: also the plot and ``summary.json``); checkpoints every
    ``save_every`` steps and after the last. Stopped by a signal (``interrupts.py``), it saves the
    last complete step and raises ``interrupts.Interrupted``."""
    cfg = run.cfg
    assert cfg.out is not None, "resolve_auto gives --out its value"
    history = []
    reporter = report.Reporter(cfg, run.start, metrics.line, run.started) if run.main else None
    saver = checkpointer(run)
    stopped = None
    interrupts.begin_training()
    try:
        if run.start == 0:
            evaluate_run(run, 0, reporter, score)
        for step in range(run.start, cfg.steps):
            row = _train_step_or_stop(run, step)
            if row is None:
                stopped = step  # steps done so far
                break
            history.append(row)
            if reporter is not None:
                reporter.step(row)
            if step + 1 == cfg.steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                evaluate_run(run, step + 1, reporter, score)
            if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                run.residency.checkpoint()
                saver.save(step + 1, run.model, run.tokenizer, run.optimizer, dataclasses.asdict(cfg))
        if stopped is not None:  # the last complete step, unless it was just saved
            run.residency.checkpoint()
            saver.save(stopped, run.model, run.tokenizer, run.optimizer, dataclasses.asdict(cfg))
        else:  # the finished run, once: the test problems chose nothing
            evaluate_run(run, cfg.steps, reporter, score, split="test")
        saver.wait()
    finally:
        if run.executor is not None:
            run.executor.shutdown(wait=False)
        if reporter is not None:
            sandboxes = run.executor.sandboxes() if run.executor is not None else {}
            saves = {"checkpoint_s": round(saver.seconds, 3), "checkpoints": saver.saves}
            run.summary = reporter.close(find_checkpoint(cfg.out), {"sandbox": sandboxes, **saves})
    if stopped is not None:
        signum = interrupts.stopping()
        assert signum is not None, "a step is abandoned only for a signal"
        raise interrupts.Interrupted(signum, step=stopped, checkpoint=find_checkpoint(cfg.out))
    return history


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_config(argv)
    if cfg.plan_memory:  # from config.json alone: nothing loaded, nothing written
        return plan_cli.main(cfg)
    ranked = distributed.launched_by_torchrun()
    rank = distributed.env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    if rank == 0:
        print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    assert cfg.out is not None, "resolve_auto gives --out its value"
    out_is_new = rank == 0 and not os.path.lexists(cfg.out)
    run = None
    try:
        with interrupts.handling():
            run = setup(cfg)
            fit(run)
    except interrupts.Interrupted as exc:  # Ctrl-C or SIGTERM: the last complete step is saved
        if run is not None and not exc.at_once:
            distributed.close(run.dist)
        return interrupts.report(exc, cfg, rank, ranked)
    except AgreedError as exc:  # every rank stops with the same message: rank 0 says it once
        if rank == 0:
            print(f"arpo_fast.train: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, CheckpointError, OSError) as exc:  # bad settings, data, files
        distributed.report_error(describe_error(exc), rank, ranked)
        return 2
    except Exception as exc:  # noqa: BLE001 - a distributed run: say which rank failed, and how
        if not ranked:
            raise
        distributed.report_error(f"{type(exc).__name__}: {describe_error(exc)}", rank, ranked)
        return 1  # torchrun then stops the other ranks
    finally:
        if out_is_new:  # a run that failed before its first step leaves no folder behind
            run_dir.remove_if_unused(Path(cfg.out))
    distributed.close(run.dist)
    if rank == 0:
        s = run.summary
        assert s is not None, "fit writes the summary on rank 0"
        for line in report.closing_lines(s):
            print(line, flush=True)
        print(
            f"{s['steps']} steps in {s['wall_s']:.0f}s; checkpoint, metrics.jsonl, metrics.png and "
            f"summary.json in {cfg.out}",
            flush=True,
        )
    return 0
