"""Every setting as a flag: its section of ``--help``, its choices, the name of the same setting in
the reference's verl scripts, and the conversion between the text a person writes (on the command
line or in a YAML file) and the setting's value.

The settings themselves, their defaults and help texts are ``TrainConfig``'s fields (``config.py``);
this module only describes how they are shown and read, so that ``cli.py`` (argparse) and
``run_config.py`` (YAML) read a value the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass
from typing import Any, Optional

from arpo_fast.settings import bool_of, help_of
from arpo_fast.train.config import GROUPS, TrainConfig, group_default
from arpo_fast.train.update_config import IMPLEMENTATIONS, LOSS_AGG, OLD_LOGPROBS

SECTIONS = {  # title: what the section is about
    "data": "the training prompts, how many a step takes, how many steps",
    "model": "the policy and where it runs",
    "rollout (ARPO)": "the tree rollout: trajectories per prompt, branching, sampling",
    "tools": "what the model may call, and how often",
    "rewards": "how each trajectory is scored",
    "update": "the clipped policy-gradient update and its batches",
    "LoRA": "train small adapters on a frozen base instead of every weight",
    "memory": "the per-GPU memory plan, the KV pool and where the optimizer state lives",
    "distributed": "runs under torchrun",
    "evaluation": "held-out prompts, evaluated at step 0, every --eval-every steps and at the end",
    "output": "the run folder, checkpoints, resuming, reporting",
}

_NAMED = {
    "data": ("data", "prompts_per_step", "steps", "seed"),
    "model": ("model", "tokenizer", "device", "dtype", "cpu_threads", "demo_warm_start"),
    "rollout (ARPO)": ("temperature", "top_p", "top_k"),
    "tools": ("tools", "tool_settings", "max_calls", "tool_workers", "stop_at_answer"),
    "rewards": ("reward", "reward_by_source", "reward_key"),
    "update": ("advantage", "lr", "weight_decay"),
    "LoRA": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "save_merged"),
    "memory": ("plan_memory", "gpus", "gpu_memory_gib", "kv_memory_mb", "offload_optimizer"),
    "distributed": (
        "hsdp_replicas",
        "dist_timeout_s",
        "setup_timeout_s",
        "rollout_timeout_s",
        "update_timeout_s",
    ),
    "evaluation": ("eval_data", "eval_every", "eval_limit", "eval_samples", "eval_temperature", "test_data"),
    "output": ("out", "resume", "save_every", "keep_checkpoints", "async_save", "report_to", "plot_every"),
}
_GROUP_SECTION = {"rollout": "rollout (ARPO)", "update": "update"}
"""Sections of the settings classes inside TrainConfig: each of their fields goes there."""

VERL = {
    # the reference's scripts (ARPO/scripts/*.sh, config/ppo_trainer.yaml) name these so
    "data": "data.train_files",
    "prompts_per_step": "data.train_batch_size",
    "steps": "trainer.total_training_steps",
    "model": "actor_rollout_ref.model.path",
    "tokenizer": "data.tokenizer",
    "device": "trainer.device",
    "dtype": "actor_rollout_ref.rollout.dtype",
    "rollouts": "actor_rollout_ref.rollout.n",
    "initial": "actor_rollout_ref.rollout.initial_rollouts",
    "branches": "actor_rollout_ref.rollout.beam_size",
    "threshold": "actor_rollout_ref.rollout.branch_probability",
    "entropy_weight": "actor_rollout_ref.rollout.entropy_weight",
    "max_response_tokens": "data.max_response_length",
    "temperature": "actor_rollout_ref.rollout.temperature",
    "top_p": "actor_rollout_ref.rollout.top_p",
    "top_k": "actor_rollout_ref.rollout.top_k",
    "tools": "actor_rollout_ref.rollout.tools.tool_instances",
    "tool_settings": "actor_rollout_ref.rollout.tools.tool_instances.NAME.params",
    "max_calls": "actor_rollout_ref.rollout.tools.call_limit",
    "tool_workers": "actor_rollout_ref.rollout.tools.max_workers",
    "reward": "custom_reward_function.name",
    "reward_key": "data.reward_fn_key",
    "lr": "actor_rollout_ref.actor.optim.lr",
    "weight_decay": "actor_rollout_ref.actor.optim.weight_decay",
    "clip_low": "actor_rollout_ref.actor.clip_ratio_low",
    "clip_high": "actor_rollout_ref.actor.clip_ratio_high",
    "dual_clip": "actor_rollout_ref.actor.clip_ratio_c",
    "entropy_coef": "actor_rollout_ref.actor.entropy_coeff",
    "grad_clip": "actor_rollout_ref.actor.grad_clip",
    "mini_batch_prompts": "actor_rollout_ref.actor.ppo_mini_batch_size",
    "micro_batch_tokens": "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
    "kl_coef": "actor_rollout_ref.actor.kl_loss_coef",
    "loss_agg": "actor_rollout_ref.actor.loss_agg_mode",
    "gradient_checkpointing": "actor_rollout_ref.model.enable_gradient_checkpointing",
    "lora_rank": "actor_rollout_ref.model.lora_rank",
    "lora_alpha": "actor_rollout_ref.model.lora_alpha",
    "lora_targets": "actor_rollout_ref.model.target_modules",
    "eval_data": "data.val_files",
    "eval_every": "trainer.test_freq",
    "eval_samples": "actor_rollout_ref.rollout.val_kwargs.n",
    "eval_temperature": "actor_rollout_ref.rollout.val_kwargs.temperature",
    "out": "trainer.default_local_dir",
    "save_every": "trainer.save_freq",
    "resume": "trainer.resume_mode",
    "report_to": "trainer.logger",
}

CHOICES: dict[str, tuple[str, ...]] = {
    "advantage": ("soft", "hard"),
    "device": ("auto", "cpu", "cuda", "cuda:N"),
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "entropy_reduce": ("sum", "mean"),
    "arpo_semantics": ("ours", "reference"),
    "branch_budget": ("split", "pooled"),
    "attn_implementation": IMPLEMENTATIONS,
    "loss_agg": LOSS_AGG,
    "gradient_checkpointing": ("auto", "true", "false"),
    "old_logprobs": OLD_LOGPROBS,
    "report_to": ("none", "tensorboard", "wandb"),
    "resume": ("true", "false", "auto"),
}
JSON_SETTINGS = ("tool_settings", "reward_by_source")
"""Settings holding a JSON object: a YAML file may write them as a mapping."""
LIST_SETTINGS = ("tools", "report_to", "lora_targets")
"""Comma-separated settings: a YAML file may write them as a list."""
AUTO = "auto"


@dataclass(frozen=True)
class Flag:
    name: str
    """The field's name (``max_response_tokens``); the flag is ``--max-response-tokens``."""
    kind: type
    """bool, int, float or str."""
    auto: bool
    """Whether None (written ``auto``) is a value: a default that depends on the job."""
    default: Any
    help: str
    section: str

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str) -> Any:
        """The value of ``text`` as written on the command line; ValueError says what was expected."""
        if self.auto and text == AUTO:
            return None
        if self.kind is bool:
            value = bool_of(text)
            if value is None:
                raise ValueError(f"expected true or false, got {text!r}")
            return value
        if self.kind in (int, float):
            try:
                return self.kind(text)
            except ValueError:
                what = "an integer" if self.kind is int else "a number"
                raise ValueError(f"expected {what}{' or auto' if self.auto else ''}, got {text!r}") from None
        return text

    def read(self, value: Any) -> Any:
        """The value of ``value`` as a YAML file holds it (any type): it means what the same text
        on the command line means."""
        if value is None:
            if self.auto:
                return None
            hint = " (write '' for none)" if self.kind is str else ""
            raise ValueError(f"expected a value, got null{hint}")
        if isinstance(value, (dict, list)):
            if self.name in JSON_SETTINGS and isinstance(value, dict):
                return json.dumps(value)
            if self.name in LIST_SETTINGS and all(isinstance(v, str) for v in value):
                return ",".join(value)
            raise ValueError(f"expected a single value, got {json.dumps(value)[:60]}")
        if isinstance(value, bool):
            return self.parse("true" if value else "false") if self.kind is not str else _no_text(value)
        if isinstance(value, (int, float)) and self.kind is float:
            return float(value)
        return self.parse(str(value))

    def show(self, value: Any) -> str:
        """``value`` as text (for --help and messages): None as auto, booleans as true/false."""
        if value is None:
            return AUTO
        if isinstance(value, bool):
            return "true" if value else "false"
        if value == "":
            return "''"
        return str(value)


def _no_text(value: bool) -> str:
    raise ValueError(f"expected text, got {str(value).lower()} (quote it: '{str(value).lower()}')")


def _kind(hint: Any) -> tuple[type, bool]:
    """(bool/int/float/str, whether None is allowed) of a field's type hint."""
    args = typing.get_args(hint)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def _defaults() -> dict[str, Any]:
    """Each flag's own default (not resolved for a job): ``TrainConfig``'s fields, and the fields of
    the ``rollout`` and ``update`` it builds by default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in GROUPS:
            values |= dataclasses.asdict(group_default(f.name))
        else:
            values[f.name] = f.default
    return values


def _section(name: str, group: Optional[str]) -> str:
    for section, names in _NAMED.items():
        if name in names:
            return section
    return _GROUP_SECTION[group] if group else "other"


def all_flags() -> list[Flag]:
    """Every flag, by section (in ``SECTIONS``' order), each section in the order it names its flags
    and then in ``TrainConfig``'s order, the fields of ``rollout`` and ``update`` in place."""
    defaults = _defaults()
    flags = []
    for f in dataclasses.fields(TrainConfig):
        owner, group = (GROUPS[f.name], f.name) if f.name in GROUPS else (TrainConfig, None)
        hints = typing.get_type_hints(owner)
        for field in dataclasses.fields(owner) if group else [f]:
            kind, auto = _kind(hints[field.name])
            flags.append(
                Flag(
                    field.name, kind, auto, defaults[field.name], help_of(field), _section(field.name, group)
                )
            )
    order = {name: i for names in _NAMED.values() for i, name in enumerate(names)}
    sections = list(SECTIONS) + ["other"]
    return sorted(flags, key=lambda f: (sections.index(f.section), order.get(f.name, -1)))


def by_name() -> dict[str, Flag]:
    return {f.name: f for f in all_flags()}


def lookup(name: str, flags: dict[str, Flag], where: str) -> Flag:
    """The flag of a setting named ``name`` (``-`` or ``_``); an unknown name is a ValueError naming
    ``where`` and the closest names."""
    key = name.replace("-", "_")
    if key in flags:
        return flags[key]
    close = difflib.get_close_matches(key, list(flags), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"{where}: unknown setting {name!r}{hint}")


def _as_flags(text: str, names: set[str]) -> str:
    """Settings named in ``text`` by their field names (``clip_low``, `rollouts`) as flags."""
    text = re.sub(r"`(\w+)`", lambda m: "--" + m[1].replace("_", "-") if m[1] in names else m[0], text)
    text = re.sub(r"(?<![-\w])([a-z0-9]+(?:_[a-z0-9]+)+)\b", lambda m: _flag_or(m[1], names), text)
    return re.sub(r"``(.+?)``", r"'\1'", text)


def _flag_or(word: str, names: set[str]) -> str:
    return "--" + word.replace("_", "-") if word in names else word


def help_text(flag: Flag, names: set[str]) -> str:
    """The flag's help as ``--help`` shows it: settings named as flags, its default, and the name of
    the same setting in the reference's verl scripts."""
    text = _as_flags(flag.help, names) + f" [default: {flag.show(flag.default)}]"
    if flag.name in VERL:
        text += f" (verl: {VERL[flag.name]})"
    return text.replace("%", "%%")  # argparse formats help with %
