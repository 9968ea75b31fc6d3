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

import contextlib
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
from typing import Optional

import torch

from arpo_fast.algo import group_advantages, tree_advantages
from arpo_fast.engine import Engine, SamplingParams
from arpo_fast.rollout import Protocol, RewardConfig, compute_reward
from arpo_fast.rollout.rewards import response_text
from arpo_fast.rollout.rollout_tree import RolloutTree
from arpo_fast.rollout.tools.executor import ToolExecutor
from arpo_fast.rollout.tree import arpo_rollout
from arpo_fast.seeds import child_seed
from arpo_fast.train import build, distributed, metrics, report
from arpo_fast.train.checkpoint import (
    NAMES,
    CheckpointError,
    check_checkpoint_names,
    find_checkpoint,
    load_sharded_state,
    save_checkpoint,
    validate_checkpoint,
)
from arpo_fast.train.config import TrainConfig, parse_config
from arpo_fast.train.data import load_examples, source_rows, step_batch
from arpo_fast.train.eval import evaluate
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
    tokenizer: object
    optimizer: object
    """``optim.MasterWeights`` (one process) or ``distributed.ShardedPolicy``."""
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

    @property
    def main(self) -> bool:
        """Whether this process prints, writes metrics and writes checkpoints."""
        return self.dist is None or self.dist.main


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash (or blank) counts as after all."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _check_out(cfg: TrainConfig, distributed_run: bool) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to resume from (with its trainer state), after checking that a fresh run would
    not overwrite an earlier one or anything else. Reads only."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if not cfg.resume:
        taken = [
            p.name for p in (out / "metrics.jsonl", *(out / n for n in NAMES)) if p.exists() or p.is_symlink()
        ]
        if taken:
            raise ValueError(
                f"{out} already holds a run ({', '.join(taken)}); pass --resume true to "
                "continue it, or choose another --out"
            )
        return None, None
    checkpoint = find_checkpoint(cfg.out)
    if checkpoint is None:
        raise ValueError(f"--resume: no checkpoint in {out}")
    state = validate_checkpoint(checkpoint, distributed_run)
    check_checkpoint_names(out)  # the next save may rename or remove any of them
    return checkpoint, state


def _prepare_out(cfg: TrainConfig, state: Optional[dict]) -> None:
    """Make the run's folder; a resumed run's metrics keep only the rows it does not redo."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    if state is not None and metrics_file.exists():
        rows = [
            line
            for line in metrics_file.read_text(encoding="utf-8").splitlines()
            if _step_of(line) <= state["step"]
        ]
        tmp = out / "metrics.jsonl.tmp"
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        tmp.replace(metrics_file)  # whole or not at all


def setup(cfg: TrainConfig, model=None, tokenizer=None) -> Run:
    """Check the settings, load (or resume) the model, and build the engine, tools and optimizer.
    ``model`` and ``tokenizer``: train these instead of loading ``cfg.model`` (not with resume).
    Under torchrun every rank calls this; a setting that fails on any rank fails on all of them,
    with its message, before anything is written."""
    if (model is None) != (tokenizer is None):
        raise ValueError("setup: pass both model and tokenizer, or neither")
    if model is not None and cfg.resume:
        raise ValueError("setup: resume loads the checkpoint's model; do not pass one")
    started = time.perf_counter()
    d = distributed.init(cfg.device, cfg.dist_timeout_s)
    with _agreed(d):
        rewards = build.reward_config(cfg)  # names and JSON settings fail here, before any loading
        settings = build.tool_settings(cfg)
        report.check(cfg)
        rows = source_rows(cfg.data, "--data")  # a bad data file fails before the model loads
        eval_rows = None if cfg.eval_data == "none" else source_rows(cfg.eval_data, "--eval-data")
        checkpoint, state = _check_out(cfg, d is not None)
        build.check_model_source(cfg, resuming=checkpoint is not None)
    if d is None or d.main:
        _prepare_out(cfg, state)
    with _agreed(d):
        device, dtype = build.resolve_device(cfg)
        device = d.device if d else device
        torch.manual_seed(cfg.seed)
        if model is None:
            model, tokenizer = build.load_model(cfg, checkpoint, device, dtype, verbose=d is None or d.main)
        longest = model.config.max_position_embeddings - 1
        examples = load_examples(cfg.data, tokenizer, longest, rows=rows)
        eval_examples = (
            []
            if cfg.eval_data == "none"
            else load_examples(cfg.eval_data, tokenizer, longest, demo_split="heldout", rows=eval_rows)
        )
        update_plan = cfg.update.describe(device)  # e.g. flash_attention_2 without flash-attn fails here
        starting = None
        if cfg.update.kl_coef:  # the policy the run started from: a resumed run loads it again
            starting = (
                model if checkpoint is None else build.load_model(cfg, None, device, dtype, verbose=False)[0]
            )
    reference = None
    if starting is not None:
        reference = distributed.shard(starting, d, dtype) if d else copy.deepcopy(starting)
        reference.requires_grad_(False)
    if d is None:
        optimizer = MasterWeights(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scorer = model
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
    else:
        optimizer = distributed.ShardedPolicy(model, d, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scorer = optimizer.scorer
        if state is not None:
            load_sharded_state(checkpoint, optimizer)
    start = 0 if state is None else state["step"]
    if state is not None:
        log.info("resumed from %s after step %d", checkpoint, start)
    log.info("update: %s", update_plan)
    kv = {"kv_memory": cfg.kv_memory_mb << 20} if cfg.kv_memory_mb else {}
    engine = Engine(model, tokenizer=tokenizer, on_pool_exhausted="preempt", **kv)
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
    )


class AgreedError(ValueError):
    """An error of the setup that every rank of a distributed run raises together (the first
    failing rank's message), so that rank 0 alone reports it."""


@contextlib.contextmanager
def _agreed(d: Optional[distributed.Dist]):
    """Run a phase of the setup; in a distributed run the ranks then compare notes, and if any
    failed, all raise :class:`AgreedError` with the first failure's message."""
    if d is None:
        yield
        return
    error = None
    try:
        yield
    except (ValueError, KeyError, TypeError, CheckpointError, OSError) as exc:
        error = describe_error(exc)
    failed = [(rank, e) for rank, e in enumerate(d.gather(error)) if e is not None]
    if failed:
        raise AgreedError(failed[0][1])


def train_step(run: Run, step: int) -> dict:
    """One step (0-based): rollout -> reward -> advantage -> update; returns its metrics."""
    cfg, d = run.cfg, run.dist
    order = step_batch(len(run.examples), cfg.prompts_per_step, step, cfg.seed)
    mine = d.mine(len(order)) if d else list(range(len(order)))  # positions in the step's prompts
    batch = [run.examples[order[j]] for j in mine]
    t0 = time.perf_counter()
    rollout = _roll_out(run, step, [e.prompt_ids for e in batch], mine)
    t1 = time.perf_counter()
    rewards = score(rollout.trajectories, batch, run.tokenizer, run.rewards)
    seq_adv = group_advantages([r.score for r in rewards], [t.prompt_index for t in rollout.trajectories])
    advantages = tree_advantages(seq_adv, rollout, cfg.advantage)
    t2 = time.perf_counter()
    data = _update_data(run, rollout, advantages, mine)
    update_metrics = update(run.scorer, run.optimizer, data, cfg.update, reference=run.reference, dist=d)
    t3 = time.perf_counter()
    extra = {"attn_implementation": cfg.update.resolved(next(run.scorer.parameters()).device)[0]}
    if d is not None:
        moved = run.optimizer.take_refresh_stats()
        extra |= {
            "weight_refresh_mb": round(moved["bytes"] / 2**20, 3),
            "weight_refresh_s": round(moved["seconds"], 4),
        }
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
    return UpdateData(rollout, advantages, pad_id, cfg.temperature, mini_batches=groups)


def train(cfg: TrainConfig, model=None, tokenizer=None) -> list[dict]:
    """Set up (see :func:`setup`) and run the training loop; returns each step's metrics."""
    return fit(setup(cfg, model, tokenizer))


def _evaluate(run: Run, step: int, reporter: Optional[report.Reporter]) -> None:
    """A held-out evaluation (``eval.py``); under torchrun each rank takes its share of the
    examples and rank 0 reports the whole."""
    if not run.eval_examples:
        return
    d = run.dist
    mine = d.mine(len(run.eval_examples)) if d else list(range(len(run.eval_examples)))
    row = evaluate(run, [run.eval_examples[i] for i in mine], step, score, positions=mine)
    if d is not None:
        row = metrics.eval_row(row, d)
    if reporter is not None:
        reporter.evaluation(row)


def fit(run: Run) -> list[dict]:
    """Steps from ``run.start`` to ``cfg.steps``; each one's metrics are shown, appended to
    ``out/metrics.jsonl`` and returned; held-out evaluations at step 0, every ``eval_every`` steps
    and after the last (``report.py``: also the plot and ``summary.json``); checkpoints every
    ``save_every`` steps and at the end."""
    cfg = run.cfg
    history = []
    reporter = report.Reporter(cfg, run.start, metrics.line, run.started) if run.main else None
    checkpoint = None
    try:
        if run.start == 0:
            _evaluate(run, 0, reporter)
        for step in range(run.start, cfg.steps):
            row = train_step(run, step)
            history.append(row)
            if reporter is not None:
                reporter.step(row)
            if step + 1 == cfg.steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                _evaluate(run, step + 1, reporter)
            if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                checkpoint = save_checkpoint(
                    cfg.out,
                    run.model,
                    run.tokenizer,
                    run.optimizer,
                    step + 1,
                    dataclasses.asdict(cfg),
                    run.dist,
                )
    finally:
        if run.executor is not None:
            run.executor.shutdown(wait=False)
        if reporter is not None:
            run.summary = reporter.close(checkpoint or find_checkpoint(cfg.out))
    return history


def describe_error(exc: BaseException) -> str:
    """One line for the user: the message, or for a failed file operation the path and the reason
    (``OSError.args[0]`` alone is only the errno)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{where}: {exc.strerror}" if where else exc.strerror
    text = str(exc.args[0]) if exc.args else str(exc) or type(exc).__name__
    return " ".join(text.split())


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only ever an empty folder
    except OSError:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_config(argv)
    ranked = distributed.launched_by_torchrun()
    rank = distributed.env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    if rank == 0:
        print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    out_is_new = rank == 0 and not os.path.lexists(cfg.out)
    try:
        run = setup(cfg)
        fit(run)
    except AgreedError as exc:  # every rank stops with the same message: rank 0 says it once
        if rank == 0:
            print(f"arpo_fast.train: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, CheckpointError, OSError) as exc:  # bad settings, data, files
        where = f" (rank {rank})" if ranked else ""
        print(f"arpo_fast.train: error{where}: {describe_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a distributed run: say which rank failed, and how
        if not ranked:
            raise
        print(
            f"arpo_fast.train: error (rank {rank}): {type(exc).__name__}: {describe_error(exc)}",
            file=sys.stderr,
            flush=True,
        )
        return 1  # torchrun then stops the other ranks
    finally:
        if out_is_new:  # a run that failed before writing anything leaves no empty folder behind
            _remove_if_empty(Path(cfg.out))
    distributed.close(run.dist)
    if rank == 0:
        s = run.summary
        if s["final_accuracy"] is not None:
            start = "" if s["warm_start_accuracy"] is None else f"{s['warm_start_accuracy']:.2f} -> "
            print(f"held-out accuracy {start}{s['final_accuracy']:.2f}", flush=True)
        print(
            f"{s['steps']} steps in {s['wall_s']:.0f}s; checkpoint, metrics.jsonl, metrics.png and "
            f"summary.json in {cfg.out}",
            flush=True,
        )
    return 0
