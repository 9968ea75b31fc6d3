"""The checks of :class:`~arpo_fast.train.config.TrainConfig`'s settings, each error naming its
setting (the flag's name in snake case), run when a config is built: a bad value fails before
anything loads. The settings classes of the rollout and the update check their own fields."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Optional

from arpo_fast.settings import bool_of, require_counts, require_non_negative

if TYPE_CHECKING:
    from arpo_fast.train.config import TrainConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of attention and MLP (``lora.DEFAULT_TARGETS``; peft is not imported here)."""
REPORT_TARGETS = ("tensorboard", "wandb")


def check(cfg: TrainConfig) -> None:
    """Every setting of ``cfg`` but the groups'; ``resume``'s spellings become True, False or None."""
    _check_counts(cfg)
    _check_sampling_and_names(cfg)
    check_lora(cfg)
    if not cfg.reward_key.strip():
        raise ValueError("reward_key must name a data column, e.g. data_source")
    if cfg.resume is not False and not cfg.out:
        raise ValueError("resume needs --out, the directory of the run to continue")


def _check_counts(cfg: TrainConfig) -> None:
    """Timeouts, counts, sizes and the learning rate."""
    if not (math.isfinite(cfg.dist_timeout_s) and cfg.dist_timeout_s >= 0):
        raise ValueError(f"dist_timeout_s must be >= 0, got {cfg.dist_timeout_s}")
    for name in ("setup_timeout_s", "rollout_timeout_s", "update_timeout_s"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    cfg.resume = resume_mode(cfg.resume)
    require_counts(cfg, "steps", "tool_workers")
    require_non_negative(
        cfg,
        "demo_warm_start",
        "max_calls",
        "save_every",
        "top_k",
        "weight_decay",
        "eval_every",
        "plot_every",
    )
    if cfg.eval_samples is not None:
        require_non_negative(cfg, "eval_samples")
    require_counts(cfg, "hsdp_replicas")
    if cfg.gpu_memory_gib is not None and not (math.isfinite(cfg.gpu_memory_gib) and cfg.gpu_memory_gib > 0):
        raise ValueError(f"gpu_memory_gib must be > 0 (or auto), got {cfg.gpu_memory_gib}")
    for name in ("eval_limit", "kv_memory_mb", "cpu_threads", "gpus", "prompts_per_step"):
        if getattr(cfg, name) is not None:
            require_counts(cfg, name)
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be > 0 (or auto), got {cfg.lr}")


def _check_sampling_and_names(cfg: TrainConfig) -> None:
    """The rollout's sampling and the settings that name a choice."""
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ValueError(
            f"temperature must be > 0 (the update needs the sampled distribution's "
            f"log-probs), got {cfg.temperature}"
        )
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.eval_temperature is not None and not (
        math.isfinite(cfg.eval_temperature) and cfg.eval_temperature > 0
    ):
        raise ValueError(
            f"eval_temperature must be > 0 (greedy pass@1 is always evaluated), got {cfg.eval_temperature}"
        )
    unknown = [t for t in cfg.report_targets if t not in REPORT_TARGETS]
    if unknown or not cfg.report_to.strip():
        raise ValueError(
            f"report_to must be none or a comma-separated list of {', '.join(REPORT_TARGETS)}, "
            f"got {cfg.report_to!r}"
        )
    if cfg.advantage not in ("soft", "hard"):
        raise ValueError(f"advantage must be 'soft' or 'hard', got {cfg.advantage!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {cfg.dtype!r}")


def check_lora(cfg: TrainConfig) -> None:
    """The LoRA settings, each error naming its flag (``lora.LoraSettings`` checks them again)."""
    if isinstance(cfg.lora_rank, bool) or not isinstance(cfg.lora_rank, int) or cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be an integer >= 0 (0: off), got {cfg.lora_rank!r}")
    if cfg.lora_alpha is not None and not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise ValueError(f"lora_alpha must be > 0 (or auto), got {cfg.lora_alpha}")
    if not (math.isfinite(cfg.lora_dropout) and 0 <= cfg.lora_dropout < 1):
        raise ValueError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    targets = [t.strip() for t in cfg.lora_targets.split(",")]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(
            f"lora_targets has an unknown projection {unknown[0]!r}; choose from {','.join(LORA_TARGETS)}"
        )
    if len(set(targets)) != len(targets):
        raise ValueError(f"lora_targets names a projection twice: {cfg.lora_targets!r}")
    if cfg.save_merged and not cfg.lora_rank:
        raise ValueError("save_merged needs --lora-rank (without LoRA the checkpoint is the model itself)")


def resume_mode(value) -> Optional[bool]:
    """``resume``: True, False or None (auto), from a bool, None or their spellings."""
    if value is None or isinstance(value, bool):
        return value
    spelled = bool_of(str(value))
    if spelled is not None:
        return spelled
    if str(value).lower() == "auto":
        return None
    raise ValueError(f"resume: expected true, false or auto, got {value!r}")
