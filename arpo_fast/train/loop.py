"""Train a tool-using agent with ARPO. ``python -m arpo_fast.train --help`` lists every setting.

Each step: pick ``prompts_per_step`` prompts; roll each out as an ARPO tree of ``rollouts``
trajectories on the paged-KV engine (``rollout/tree.py``); score every trajectory
(``rollout/rewards.py``); turn rewards into GRPO advantages within each prompt's group and attribute
them to tokens, soft or hard (``algo/advantages.py``); apply the clipped policy-gradient update,
token-mean over the model-written tokens (``update.py``, ``algo/loss.py``); log; save a checkpoint.
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

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import PreTrainedTokenizerBase

from arpo_fast.algo import group_advantages, tree_advantages
from arpo_fast.engine import Engine, SamplingParams
from arpo_fast.rollout import Protocol, RewardConfig, compute_reward
from arpo_fast.rollout.rewards import response_text
from arpo_fast.rollout.rollout_tree import RolloutTree
from arpo_fast.rollout.tools.executor import ToolExecutor
from arpo_fast.rollout.tree import arpo_rollout
from arpo_fast.seeds import child_seed
from arpo_fast.train import (
    build,
    distributed,
    interrupts,
    lora_run,
    metrics,
    plan_cli,
    report,
    residency,
    run_dir,
)
from arpo_fast.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_optimizer_state,
    load_sharded_state,
)
from arpo_fast.train.checkpoint_save import Checkpointer
from arpo_fast.train.cli import parse_config
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.data import prepare, step_batch, test_examples
from arpo_fast.train.distributed import AgreedError, describe_error
from arpo_fast.train.distributed import agreed as _agreed
from arpo_fast.train.eval import evaluate_run
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.update import UpdateData, numbered_mini_batches, update

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


@dataclass
class Run:
    """Everything a training step uses, built once by :func:`setup`."""

    cfg: TrainConfig
    model: torch.nn.Module
    """The weights the engine runs on (and the checkpoint saves)."""
    tokenizer: PreTrainedTokenizerBase
    optimizer: Union[MasterWeights, distributed.ShardedPolicy]
    """The fp32 masters and AdamW: ``MasterWeights`` in one process, sharded under torchrun."""
    scorer: torch.nn.Module
    """What the update runs: the model itself, or its FSDP2-sharded copy."""
    engine: Engine
    protocol: Protocol
    executor: Optional[ToolExecutor]
    examples: list
    rewards: RewardConfig
    start: int
    dist: Optional[distributed.Dist] = None
    reference: Optional[torch.nn.Module] = None
    """The frozen starting policy, held only for ``--kl-coef`` > 0."""
    eval_examples: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    summary: Optional[dict] = None
    """What ``summary.json`` holds, once ``fit`` has written it (rank 0)."""
    resumed_from: Optional[Path] = None
    """The checkpoint the run continues from (None: a fresh start)."""
    test_examples: list = field(default_factory=list)
    """Evaluated once, after the last step (``--test-data``)."""
    residency: Optional[residency.Residency] = None
    """Moves the KV pool, the optimizer state and the rollout copy between the step's phases."""

    @property
    def main(self) -> bool:
        """Whether this process prints, writes metrics and writes checkpoints."""
        return self.dist is None or self.dist.main


def setup(cfg: TrainConfig, model=None, tokenizer=None) -> Run:
    """Check the settings, load (or resume) the model, and build the engine, tools and optimizer.
    ``model`` and ``tokenizer``: train these instead of loading ``cfg.model`` (not with resume).
    Under torchrun every rank calls this; a setting that fails on any rank fails on all of them,
    with its message, before anything is written."""
    if (model is None) != (tokenizer is None):
        raise ValueError("setup: pass both model and tokenizer, or neither")
    if model is not None and cfg.resume is not False:
        raise ValueError("setup: resume loads the checkpoint's model; do not pass one")
    started = time.perf_counter()
    d = distributed.init(cfg.device, distributed.Timeouts.of(cfg), cfg.async_save, cfg.hsdp_replicas)
    if d is not None:  # rank 0's --out for all: the default one is stamped with each rank's clock
        cfg.out = d.broadcast(cfg.out, group=d.setup_group)
    build.set_threads(cfg, verbose=d is None or d.main)
    with _agreed(d):  # names and JSON settings fail here, before anything reads --out
        rewards = build.reward_config(cfg)
        settings = build.tool_settings(cfg)
        report.check(cfg)
    if d is not None:
        with _agreed(d):  # before anything reads --out: every rank must see the same folder
            run_dir.check_shared(Path(cfg.out), d)
    with _agreed(d):  # the folder, the model's source and the data, before any weights load
        checkpoint, state = run_dir.check_out(cfg, d is not None)
        lora_run.check(cfg, d is not None, checkpoint)
        build.check_model_source(cfg, resuming=checkpoint is not None)
        device, dtype = build.resolve_device(cfg)
        device = d.device if d else device
        update_plan = cfg.update.describe(device)  # e.g. flash_attention_2 without flash-attn fails here
        if model is None:
            tokenizer, context = build.load_tokenizer(cfg, checkpoint)  # config.json and tokenizer only
        else:
            context = getattr(model.config, "max_position_embeddings", None)
        examples, eval_examples = prepare(cfg, tokenizer, context)
        tests = test_examples(cfg, tokenizer, context)
    with _agreed(d):
        torch.manual_seed(cfg.seed)
        if model is None:  # a checkpoint's weights are each read and checked before anything is written
            model = build.load_model(cfg, checkpoint, device, dtype, tokenizer, verbose=d is None or d.main)
        lora_run.attach(model, cfg, checkpoint)  # before the optimizer and the engine: both use them
        starting = None
        if cfg.update.kl_coef and not cfg.lora_rank:  # the starting policy: a resume loads it again
            starting = (
                model
                if checkpoint is None
                else build.load_model(cfg, None, device, dtype, tokenizer, verbose=False)
            )
    reference = lora_run.reference(model, cfg)  # LoRA's: the adapters switched off
    if starting is not None:
        reference = distributed.shard(starting, d, dtype) if d else copy.deepcopy(starting)
        reference.requires_grad_(False)
    optimizer, scorer = _optimizer(cfg, model, d, checkpoint, state)
    if d is None or d.main:  # everything of a resumed run is loaded: now the folder may change
        run_dir.prepare_out(cfg, state)
    start = 0 if state is None else state["step"]
    if state is not None:
        log.info("resumed from %s after step %d", checkpoint, start)
    log.info("update: %s", update_plan)
    engine, memory = residency.build_engine(cfg, model, tokenizer, optimizer, d.world if d else 1, device)
    executor = build.tool_executor(cfg, settings)
    protocol = build.protocol_for(cfg, tokenizer, executor, engine.eos_token_ids)
    return Run(
        cfg,
        model,
        tokenizer,
        optimizer,
        scorer,
        engine,
        protocol,
        executor,
        examples,
        rewards,
        start,
        d,
        reference,
        eval_examples,
        started,
        resumed_from=checkpoint,
        test_examples=tests,
        residency=memory,
    )


def _optimizer(cfg: TrainConfig, model, d, checkpoint: Optional[Path], state: Optional[dict]):
    """(optimizer, scorer): fp32 masters around the model itself (one process) or its FSDP2-sharded
    copy; a resumed run's state loaded and checked into it."""
    if d is None:
        optimizer = MasterWeights(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if state is not None:
            load_optimizer_state(checkpoint, optimizer, state)
        return optimizer, lora_run.scorer(model, cfg)
    lora = lora_run.settings(cfg)
    optimizer = distributed.ShardedPolicy(model, d, lr=cfg.lr, weight_decay=cfg.weight_decay, lora=lora)
    if state is not None:
        with _agreed(d):
            load_sharded_state(checkpoint, optimizer, group=d.setup_group)
    return optimizer, optimizer.scorer


def train_step(run: Run, step: int) -> dict:
    """One step (0-based): rollout -> reward -> advantage -> update; returns its metrics."""
    cfg, d = run.cfg, run.dist
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
    update_metrics = update(run.scorer, run.optimizer, data, cfg.update, reference=run.reference, dist=d)
    t3 = time.perf_counter()
    device = next(run.scorer.parameters()).device
    extra = {"attn_implementation": cfg.update.resolved(device)[0], "lr": _learning_rate(run.optimizer)}
    if d is not None:  # the rollout copy catches up once, after the step's last optimizer step
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
    per = cfg.update.mini_batch_prompts
    groups = numbered_mini_batches(
        [mine[t.prompt_index] // per for t in rollout.trajectories], math.ceil(cfg.prompts_per_step / per)
    )
    return UpdateData(
        rollout, advantages, pad_id, cfg.temperature, groups, run.engine.vocab_limit, positions=mine
    )


def _learning_rate(optimizer: Union[MasterWeights, distributed.ShardedPolicy]) -> float:
    inner = optimizer.inner if isinstance(optimizer, MasterWeights) else optimizer.optimizer
    return inner.param_groups[0]["lr"]


def train(cfg: TrainConfig, model=None, tokenizer=None) -> list[dict]:
    """Set up (see :func:`setup`) and run the training loop; returns each step's metrics."""
    return fit(setup(cfg, model, tokenizer))


def _checkpointer(run: Run) -> Checkpointer:
    cfg = run.cfg
    saved = run.start if run.resumed_from is not None else None
    return Checkpointer(
        cfg.out,
        run.dist,
        keep=cfg.keep_checkpoints,
        async_save=cfg.async_save,
        saved_step=saved,
        lora=lora_run.files(cfg),
    )


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
    history = []
    reporter = report.Reporter(cfg, run.start, metrics.line, run.started) if run.main else None
    saver = _checkpointer(run)
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
        raise interrupts.Interrupted(interrupts.stopping(), step=stopped, checkpoint=find_checkpoint(cfg.out))
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
        for line in report.closing_lines(s):
            print(line, flush=True)
        print(
            f"{s['steps']} steps in {s['wall_s']:.0f}s; checkpoint, metrics.jsonl, metrics.png and "
            f"summary.json in {cfg.out}",
            flush=True,
        )
    return 0
