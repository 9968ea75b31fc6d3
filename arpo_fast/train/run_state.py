"""A training run's state, :class:`Run`, and :func:`setup`, which builds it: the settings checked
on every rank, the model loaded (or resumed), then the engine, tools and optimizer around it."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase

from arpo_fast.engine import Engine
from arpo_fast.rollout import Protocol, RewardConfig
from arpo_fast.rollout.tools.executor import ToolExecutor
from arpo_fast.train import build, distributed, lora_run, report, residency, run_dir, sharded_policy
from arpo_fast.train.checkpoint import load_optimizer_state, load_sharded_state
from arpo_fast.train.checkpoint_save import Checkpointer
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.data import prepare, test_examples
from arpo_fast.train.distributed import agreed as _agreed
from arpo_fast.train.optim import MasterWeights

log = logging.getLogger("arpo_fast.train")


@dataclass
class Run:
    """Everything a training step uses, built once by :func:`setup`."""

    cfg: TrainConfig
    model: torch.nn.Module
    """The weights the engine runs on (and the checkpoint saves)."""
    tokenizer: PreTrainedTokenizerBase
    optimizer: residency.Optimizer
    """The fp32 masters and AdamW: ``MasterWeights`` in one process, sharded under torchrun."""
    scorer: torch.nn.Module
    """What the update runs: the model itself, or its FSDP2-sharded copy."""
    engine: Engine
    protocol: Protocol
    executor: Optional[ToolExecutor]
    examples: list
    rewards: RewardConfig
    start: int
    residency: residency.Residency
    """Moves the KV pool, the optimizer state and the rollout copy between the step's phases."""
    dist: Optional[distributed.Dist] = None
    kl_model: Optional[torch.nn.Module] = None
    """The frozen starting policy the KL penalty is taken against, held only for ``--kl-coef`` > 0."""
    eval_examples: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    summary: Optional[dict] = None
    """What ``summary.json`` holds, once ``fit`` has written it (rank 0)."""
    resumed_from: Optional[Path] = None
    """The checkpoint the run continues from (None: a fresh start)."""
    test_examples: list = field(default_factory=list)
    """Evaluated once, after the last step (``--test-data``)."""

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
    rewards, settings = _check_names(cfg, d)
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
    model, kl_model = _models(cfg, d, model, tokenizer, checkpoint, device, dtype)
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
        memory,
        d,
        kl_model,
        eval_examples,
        started,
        resumed_from=checkpoint,
        test_examples=tests,
    )


def _check_names(cfg: TrainConfig, d) -> tuple:
    """(rewards, tool settings): the names and JSON settings checked, and under torchrun the run
    folder agreed on, before anything reads ``--out``."""
    if d is not None:  # rank 0's --out for all: the default one is stamped with each rank's clock
        cfg.out = d.broadcast(cfg.out, group=d.setup_group)
    build.set_threads(cfg, verbose=d is None or d.main)
    with _agreed(d):
        rewards = build.reward_config(cfg)
        settings = build.tool_settings(cfg)
        report.check(cfg)
    assert cfg.out is not None, "resolve_auto gives --out its value"
    if d is not None:
        with _agreed(d):  # every rank must see the same folder
            run_dir.check_shared(Path(cfg.out), d)
    return rewards, settings


def _models(cfg: TrainConfig, d, model, tokenizer, checkpoint: Optional[Path], device, dtype) -> tuple:
    """(model, kl_model): the trained model (loaded unless given, LoRA's adapters attached) and the
    frozen policy the KL penalty is taken against (None without ``--kl-coef``)."""
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
    kl_model: Optional[torch.nn.Module] = lora_run.kl_model(model, cfg)  # LoRA's: the adapters off
    if starting is not None:
        frozen = sharded_policy.shard(starting, d, dtype) if d else copy.deepcopy(starting)
        frozen.requires_grad_(False)
        kl_model = frozen
    return model, kl_model


def _optimizer(
    cfg: TrainConfig, model, d, checkpoint: Optional[Path], state: Optional[dict]
) -> tuple[residency.Optimizer, torch.nn.Module]:
    """(optimizer, scorer): fp32 masters around the model itself (one process) or its FSDP2-sharded
    copy; a resumed run's state loaded and checked into it."""
    assert cfg.lr is not None, "resolve_auto gives --lr its value"
    if d is None:
        masters = MasterWeights(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if state is not None:
            assert checkpoint is not None, "a resumed run's state comes from its checkpoint"
            load_optimizer_state(checkpoint, masters, state)
        return masters, lora_run.scorer(model, cfg)
    lora = lora_run.settings(cfg)
    policy = sharded_policy.ShardedPolicy(model, d, lr=cfg.lr, weight_decay=cfg.weight_decay, lora=lora)
    if state is not None:
        assert checkpoint is not None, "a resumed run's state comes from its checkpoint"
        with _agreed(d):
            load_sharded_state(checkpoint, policy, group=d.setup_group)
    return policy, policy.scorer


def checkpointer(run: Run) -> Checkpointer:
    """What writes the run's checkpoints (``checkpoint_save.py``), aware of a resumed run's last save."""
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
