"""The training run's settings as one dataclass, and the command line built from it.

Every field is a ``--kebab-case`` flag whose help text the field carries (``arpo_fast.settings``),
the fields of the tree rollout's ``ARPOConfig`` and the update's ``UpdateConfig`` included; the
defaults are the built-in demo's (see ``demo.py``), with the reference's algorithm settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time
from dataclasses import dataclass, fields
from typing import Optional

from arpo_fast.rollout.config import ARPOConfig
from arpo_fast.settings import help_of, require_counts, require_non_negative, setting
from arpo_fast.train.update_config import UpdateConfig

REFERENCE_LR = 1e-6


@dataclass
class TrainConfig:
    # --- what to train on
    model: str = setting(
        "demo", "'demo' (a tiny random Qwen2 and its tokenizer) or a local Hugging Face model directory."
    )
    tokenizer: str = setting(
        "",
        "Directory of the tokenizer ('': the model's). A tokenizer of your own "
        "saved beside a model's config.json may load as the model type's instead.",
    )
    data: str = setting(
        "demo", "'demo' (built-in multiplication problems) or a JSONL or Parquet file (see docs/training.md)."
    )
    reward: str = setting(
        "arpo_f1",
        "Reward of every example whose data_source is not in "
        "`reward_by_source` (arpo_f1, exact_match, math, or one added with "
        "arpo_fast.rollout.register_reward).",
    )
    reward_by_source: str = setting(
        "", 'JSON object mapping a data_source to its reward name, e.g. \'{"gsm8k": "math"}\'.'
    )
    demo_warm_start: int = setting(
        600, "Supervised warm-up steps of the demo model on well-formed solutions (0: start random)."
    )
    tools: str = setting(
        "python", "Comma-separated tools the model may call (python, search, http_search); '' for none."
    )
    tool_settings: str = setting(
        "", 'JSON object of each tool\'s settings, e.g. \'{"search": {"corpus_path": "wiki.jsonl"}}\'.'
    )
    max_calls: int = setting(
        3,
        "Tool calls allowed per trajectory (the reference: 3 for reasoning, 6 for "
        "deep search); a call past it is not run and the trajectory ends with EOS.",
    )
    stop_at_answer: bool = setting(
        False,
        "End a trajectory at </answer>; off (the reference), it "
        "goes on to EOS and text after the answer is scored too.",
    )
    # --- the run
    steps: int = setting(30, "Training steps (each: rollout, reward, advantage, update).")
    prompts_per_step: int = setting(
        8, "Prompts rolled out per step; each becomes a tree of `rollouts` trajectories."
    )
    seed: int = setting(0, "Seeds the data order, the model's initialisation (demo) and every sampling draw.")
    device: str = setting("auto", "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = setting("auto", "'auto' (bf16 on CUDA, fp32 on the CPU), 'bf16', 'fp16' or 'fp32'.")
    out: str = setting("", "Directory for metrics.jsonl and checkpoints ('': a new runs/arpo-<date>-<time>).")
    dist_timeout_s: float = setting(
        1800.0,
        "Under torchrun: seconds a collective may wait for the other "
        "ranks before the run fails (rollouts with slow tools run between "
        "collectives).",
    )
    tool_workers: int = setting(
        16,
        "Tool calls that may run at once, per process (each python call is "
        "a sandboxed process: a node runs up to processes x this many).",
    )
    save_every: int = setting(0, "Save a checkpoint every this many steps (0: only after the last step).")
    resume: bool = setting(False, "Continue from the checkpoint in `out`, if there is one.")
    # --- evaluation and reporting
    eval_data: str = setting(
        "",
        "Held-out prompts, in --data's formats: '' (the demo's held-out problems "
        "when --data is demo, else none), 'none', 'demo' or a file.",
    )
    eval_every: int = setting(
        5, "Evaluate every this many steps, besides at step 0 and after the last (0: only those two)."
    )
    eval_samples: int = setting(
        0, "k sampled answers per held-out prompt for pass@k and mean@k (0: only greedy pass@1)."
    )
    eval_temperature: float = setting(1.0, "Sampling temperature of the pass@k/mean@k answers.")
    report_to: str = setting(
        "",
        "Also write the metrics to: '' (nowhere else) or 'tensorboard' (in "
        "out/tensorboard; pip install 'arpo_fast[tensorboard]').",
    )
    # --- rollout (the tree's own settings are in `rollout`)
    rollout: ARPOConfig = setting(
        factory=lambda: ARPOConfig(max_response_tokens=64),
        help="The tree rollout (flags --rollouts ... --max-response-tokens; the demo's responses are short).",
    )
    temperature: float = setting(
        1.0, "Sampling temperature of the rollout (and of the log-probs the update uses); > 0."
    )
    top_p: float = setting(1.0, "Nucleus sampling for the rollout (1: off).")
    top_k: int = setting(0, "Top-k sampling for the rollout (0: off).")
    kv_memory_mb: int = setting(
        0, "KV-cache pool size in MiB (0: the engine's default share of free memory)."
    )
    # --- update (the clipped loss and batching are in `update`)
    update: UpdateConfig = setting(
        factory=UpdateConfig, help="The clipped update (flags --clip-low ... --micro-batch-tokens)."
    )
    advantage: str = setting(
        "soft", "'soft' (GRPO on the leaves, the reference's default) or 'hard' (shared tokens get the mean)."
    )
    lr: float = setting(
        0.0,
        "AdamW learning rate; 0: the reference's 1e-6, or the demo's 1e-4 with "
        "--model demo (a 0.6M-parameter model barely moves at 1e-6).",
    )
    weight_decay: float = setting(0.01, "AdamW's decoupled weight decay (the reference's: 0.01).")

    def __post_init__(self):
        if not (math.isfinite(self.dist_timeout_s) and self.dist_timeout_s > 0):
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        require_counts(self, "steps", "prompts_per_step", "tool_workers")
        require_non_negative(
            self,
            "demo_warm_start",
            "max_calls",
            "save_every",
            "top_k",
            "kv_memory_mb",
            "weight_decay",
            "eval_every",
            "eval_samples",
            "lr",
        )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be > 0 (the update needs the sampled distribution's "
                f"log-probs), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.eval_temperature) and self.eval_temperature > 0):
            raise ValueError(
                f"eval_temperature must be > 0 (greedy pass@1 is always evaluated), "
                f"got {self.eval_temperature}"
            )
        if self.report_to not in ("", "tensorboard"):
            raise ValueError(f"report_to must be '' or 'tensorboard', got {self.report_to!r}")
        self._resolve_defaults()
        if self.advantage not in ("soft", "hard"):
            raise ValueError(f"advantage must be 'soft' or 'hard', got {self.advantage!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if self.resume and not self.out:
            raise ValueError("resume needs --out, the directory of the run to continue")
        if not self.out:
            self.out = time.strftime("runs/arpo-%Y%m%d-%H%M%S")

    def _resolve_defaults(self) -> None:
        """Settings whose default depends on the job: the demo's learning rate and held-out set are
        never inherited by a run on a model or data of its own."""
        if not self.lr:
            from arpo_fast.train.demo import LR

            self.lr = LR if self.model == "demo" else REFERENCE_LR
        if not self.eval_data:
            self.eval_data = "demo" if self.data == "demo" else "none"

    @classmethod
    def from_flat(cls, **settings) -> TrainConfig:
        """A config from flag-level names: the fields of ``rollout`` and ``update`` sit beside the
        others (``TrainConfig.from_flat(rollouts=4, clip_low=0.1, steps=2)``)."""
        groups = {name: {} for name in _GROUPS}
        top = {}
        for key, value in settings.items():
            group = next((g for g, c in _GROUPS.items() if key in _names(c)), None)
            (groups[group] if group else top)[key] = value
        defaults = cls()
        for group, sub in groups.items():
            if sub:
                top[group] = dataclasses.replace(getattr(defaults, group), **sub)
        return cls(**top)

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tools.split(",") if t.strip())


_GROUPS = {"rollout": ARPOConfig, "update": UpdateConfig}


def _names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flags(cls):
    """(field, help) of every flag: the config's own fields, with ``rollout`` and ``update``
    replaced by their fields."""
    for f in fields(cls):
        if f.name in _GROUPS:
            yield from _flags(_GROUPS[f.name])
        else:
            yield f, help_of(f)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m arpo_fast.train",
        description="Train a tool-using agent with ARPO.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig(out="-")
    # the fields' own defaults, not the resolved ones: a flag left out is resolved for its job
    values = {
        **dataclasses.asdict(defaults.rollout),
        **dataclasses.asdict(defaults.update),
        **{f.name: f.default for f in fields(TrainConfig) if f.default is not dataclasses.MISSING},
    }
    for f, doc in _flags(TrainConfig):
        kind = _parse_bool if f.type in ("bool", bool) else {"int": int, "float": float}.get(f.type, str)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=values[f.name],
            metavar=f.name.upper() if kind is not _parse_bool else "{true,false}",
            help=doc,
        )
    return parser


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """The config from command-line flags; a bad value exits with the field's message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return TrainConfig.from_flat(**vars(args))
    except ValueError as exc:  # name the flag, not the field: "steps must be" -> "--steps must be"
        name, _, rest = str(exc).partition(" ")
        parser.error(f"--{name.replace('_', '-')} {rest}" if name in vars(args) else str(exc))
