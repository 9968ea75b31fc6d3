"""``python -m arpo_fast.train --plan-memory``: the run's memory plan per GPU (``memory.py``), from
the settings and ``--model``'s config.json alone: no GPU, no weights, nothing written."""

from __future__ import annotations

import math
import os
import sys

from arpo_fast.train.config import TrainConfig
from arpo_fast.train.demo import is_demo
from arpo_fast.train.memory import GIB, ModelShape, PlanSettings, format_plan, plan_memory
from arpo_fast.train.update_config import resolve_checkpointing

H100_GIB = 79.6
"""An "80 GB" H100: 81,559 MiB."""


def model_shape(cfg: TrainConfig) -> ModelShape:
    """The shape of ``--model``: the demo's, or read from DIR/config.json."""
    if is_demo(cfg.model):
        from arpo_fast.train.demo import demo_config, demo_tokenizer

        return ModelShape.from_config(demo_config(demo_tokenizer()))
    return ModelShape.from_folder(cfg.model)


def _gpu_gib(cfg: TrainConfig) -> float:
    if cfg.gpu_memory_gib is not None:
        return cfg.gpu_memory_gib
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return H100_GIB


def plan_settings(cfg: TrainConfig, world: int | None = None) -> PlanSettings:
    """The plan's settings for this run on ``world`` GPUs (default: ``--gpus``, else WORLD_SIZE,
    else 1). Activation checkpointing is resolved as on CUDA: the plan is a GPU's."""
    world = world or cfg.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    assert cfg.prompts_per_step is not None, "resolve_auto gives --prompts-per-step its value"
    if world % cfg.hsdp_replicas:
        raise ValueError(f"--hsdp-replicas {cfg.hsdp_replicas} must divide the number of GPUs ({world})")
    return PlanSettings(
        world=world,
        replicas=cfg.hsdp_replicas,
        gpu_gib=_gpu_gib(cfg),
        micro_batch_tokens=cfg.update.micro_batch_tokens,
        checkpointing=resolve_checkpointing(cfg.update.gradient_checkpointing, "cuda"),
        rollout_sequences=math.ceil(cfg.prompts_per_step / world) * cfg.rollout.rollouts,
        offload_optimizer=cfg.offload_optimizer,
        kl_penalty=cfg.update.kl_coef > 0,
        lora_rank=cfg.lora_rank,
        lora_targets=tuple(t.strip() for t in cfg.lora_targets.split(",")),
        lora_dropout=cfg.lora_dropout > 0,
    )


def main(cfg: TrainConfig) -> int:
    """Print the plan and return 0, whether it fits or not (the table says): the command answers a
    question. A bad setting (a model folder without a readable config.json) is one line and 2."""
    try:
        print(format_plan(plan_memory(model_shape(cfg), plan_settings(cfg))), flush=True)
    except ValueError as exc:
        print(f"arpo_fast.train: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
