"""The training run's settings as one dataclass.

Every field is a ``--kebab-case`` flag whose help text the field carries (``arpo_fast.settings``),
the fields of the tree rollout's ``ARPOConfig`` and the update's ``UpdateConfig`` included; the
defaults are the built-in demo's (see ``demo.py``), with the reference's algorithm settings. The
command line is built from these fields in ``cli.py``; ``run_config.py`` reads and writes them as
YAML (``--config FILE``, the run folder's ``config.yaml``).

A setting whose default depends on the job is ``None`` here, shown and written as ``auto``, and
resolved in one place, :meth:`TrainConfig._resolve_auto`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, fields
from typing import Optional

from arpo_fast.rollout.config import ARPOConfig
from arpo_fast.settings import bool_of, require_counts, require_non_negative, setting
from arpo_fast.train.demo import DEMO, is_demo, threads
from arpo_fast.train.demo import LORA_LR as DEMO_LORA_LR
from arpo_fast.train.demo import LR as DEMO_LR
from arpo_fast.train.demo import MINI_BATCH_PROMPTS as DEMO_MINI_BATCH
from arpo_fast.train.demo import PROMPTS_PER_STEP as DEMO_PROMPTS
from arpo_fast.train.demo import RESPONSE_TOKENS as DEMO_RESPONSE
from arpo_fast.train.update_config import UpdateConfig

REFERENCE_LR = 1e-6
REFERENCE_MINI_BATCH = 16
DEMO_EVAL_SAMPLES = 4
"""Sampled answers per held-out problem of the demo: its sampled accuracy over 4 x 128 answers."""
LORA_LR = 1e-5
"""The learning rate of LoRA adapters on a model of one's own (auto): LoRA is commonly tuned at
about 10x the rate of full-weight training, here 10x the reference's."""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of attention and MLP (``lora.DEFAULT_TARGETS``; peft is not imported here)."""
REFERENCE_PROMPTS = 128
"""The reference's prompts per step (its 7B reasoning script's ``data.train_batch_size``)."""
REFERENCE_RESPONSE = 4096
"""The reference's response length (the same script's ``data.max_response_length``)."""
REPORT_TARGETS = ("tensorboard", "wandb")


@dataclass
class TrainConfig:
    # --- what to train on
    model: str = setting(
        "demo", "'demo' (a tiny random Qwen2 and its tokenizer) or a local Hugging Face model directory."
    )
    tokenizer: Optional[str] = setting(
        None,
        "Directory of the tokenizer (auto: the model's). A tokenizer of your own "
        "saved beside a model's config.json may load as the model type's instead.",
    )
    data: str = setting(
        "demo", "'demo' (built-in multiplication problems) or a JSONL or Parquet file (see docs/training.md)."
    )
    reward: str = setting(
        "arpo_f1",
        "Reward of every example whose --reward-key value is not in "
        "--reward-by-source (arpo_f1, exact_match, math, or one added with "
        "arpo_fast.rollout.register_reward).",
    )
    reward_by_source: str = setting(
        "", 'JSON object mapping a --reward-key value to its reward name, e.g. \'{"gsm8k": "math"}\'.'
    )
    reward_key: str = setting(
        "data_source",
        "The data column whose value picks each example's reward in --reward-by-source, "
        "e.g. ability (a row without it counts as 'default').",
    )
    demo_warm_start: int = setting(
        600, "Supervised warm-up steps of the demo model on well-formed solutions (0: start random)."
    )
    cpu_threads: Optional[int] = setting(
        None,
        "Intra-op threads of torch on the CPU (auto: for --model demo, the cores the load average "
        "leaves free, at least 1, as its tiny matrices slow down when a thread waits for a busy "
        "core; otherwise torch's default: OMP_NUM_THREADS or the cores).",
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
    prompts_per_step: Optional[int] = setting(
        None,
        "Prompts rolled out per step; each becomes a tree of --rollouts trajectories (auto: the "
        "reference's 128, or the demo's 8 with --model demo).",
    )
    seed: int = setting(0, "Seeds the data order, the model's initialisation (demo) and every sampling draw.")
    device: str = setting("auto", "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = setting("auto", "'auto' (bf16 on CUDA, fp32 on the CPU), 'bf16', 'fp16' or 'fp32'.")
    out: Optional[str] = setting(
        None, "Directory of the run: metrics, plot, config.yaml, checkpoints (auto: runs/arpo-<date>-<time>)."
    )
    dist_timeout_s: float = setting(
        0.0,
        "Under torchrun: one value in seconds for --setup-timeout-s, --rollout-timeout-s and "
        "--update-timeout-s together (0: each its own).",
    )
    setup_timeout_s: float = setting(
        1800.0,
        "Under torchrun: seconds a rank may wait for the others during setup (loading, the "
        "demo's warm start) and while a checkpoint is written or read.",
    )
    rollout_timeout_s: float = setting(
        1800.0,
        "Under torchrun: seconds the first rank done with a step's rollout (or an evaluation) may "
        "wait for the last; slow tools run there.",
    )
    hsdp_replicas: int = setting(
        1,
        "Under torchrun: R replicas of the sharded weights (HSDP): the W ranks form R groups of "
        "W / R, each shards the weights, and gradients are summed across groups too. With a group "
        "per node, the per-micro-batch gathers stay on the node's links (1: shard over all ranks).",
    )
    update_timeout_s: float = setting(
        600.0,
        "Under torchrun: seconds a collective of the update may wait before the run fails (a "
        "rank that hangs there; NCCL's flight recorder then dumps each rank's recent collectives).",
    )
    tool_workers: int = setting(
        16,
        "Tool calls that may run at once, per process (each python call is "
        "a sandboxed process: a node runs up to processes x this many).",
    )
    save_every: int = setting(0, "Save a checkpoint every this many steps (0: only after the last step).")
    keep_checkpoints: int = setting(
        1, "Complete checkpoints kept: the newest in out/checkpoint, older ones as out/checkpoint-<step>."
    )
    async_save: bool = setting(
        False,
        "Under torchrun: write the sharded trainer state in the background (dcp.async_save), so "
        "the next step does not wait for the disk; the next save or the run's end completes it.",
    )
    resume: Optional[bool] = setting(
        False,
        "true: continue the run in --out from its newest complete checkpoint, with its config.yaml "
        "(flags given override it); auto: continue it if there is one, else start there afresh "
        "(the same command line for torchrun --max-restarts and requeues); false: a new run.",
    )
    # --- evaluation and reporting
    eval_data: Optional[str] = setting(
        None,
        "Held-out prompts, in --data's formats: auto (the demo's held-out problems "
        "when --data is demo, else none), 'none', 'demo' or a file.",
    )
    eval_every: int = setting(
        5, "Evaluate every this many steps, besides at step 0 and after the last (0: only those two)."
    )
    eval_limit: Optional[int] = setting(
        None,
        "Evaluate a fixed subset of this many held-out prompts, the same at every evaluation "
        "(auto: all of them).",
    )
    eval_samples: Optional[int] = setting(
        None,
        "k sampled answers per held-out prompt, besides the greedy one: the sampled accuracy "
        "(pass@1 of a sampled answer, the mean over the k) and pass@k (auto: 4 when --data is "
        "demo, else 0: greedy pass@1 only).",
    )
    eval_temperature: Optional[float] = setting(
        None, "Sampling temperature of the sampled answers (auto: --temperature, the rollout's)."
    )
    test_data: Optional[str] = setting(
        None,
        "Test prompts, evaluated once, after the last step (greedy and sampled, summary.json's "
        "test_accuracy), never during training: auto (the demo's test problems when --data is "
        "demo and --eval-data is not none, else none), 'none', 'demo' or a file.",
    )
    report_to: str = setting(
        "none",
        "Also write the metrics (and the config, the learning rate) to: none, tensorboard "
        "(in --out's tensorboard/; pip install 'arpo_fast[tensorboard]'), wandb (pip install "
        "'arpo_fast[wandb]'; WANDB_MODE=offline works without a network), or both, comma-separated.",
    )
    plot_every: int = setting(
        5, "Redraw metrics.png every this many steps (0: only after evaluations and at the end)."
    )
    # --- rollout (the tree's own settings are in `rollout`)
    rollout: ARPOConfig = setting(
        factory=lambda: ARPOConfig(max_response_tokens=None),
        help="The tree rollout (flags --rollouts ... --max-response-tokens).",
    )
    temperature: float = setting(
        1.0, "Sampling temperature of the rollout (and of the log-probs the update uses); > 0."
    )
    top_p: float = setting(1.0, "Nucleus sampling for the rollout (1: off).")
    top_k: int = setting(0, "Top-k sampling for the rollout (0: off).")
    kv_memory_mb: Optional[int] = setting(
        None,
        "KV-cache pool size in MiB (auto: on CUDA, what the rollout leaves once the trainer's state "
        "is counted, AdamW's included, less 5% headroom; the pool is released during the update).",
    )
    # --- memory
    offload_optimizer: bool = setting(
        False,
        "Keep the fp32 master weights and AdamW state in CPU memory during the rollout and the "
        "evaluations, on the GPU only for the update: their 12 bytes a trained parameter (per "
        "rank: / the ranks sharing them) go to the KV pool.",
    )
    plan_memory: bool = setting(
        False,
        "Print this run's memory plan per GPU (weights, shards, optimizer, activations at "
        "micro_batch_tokens, the KV pool, what is free) from --model's config.json alone, without "
        "a GPU and without loading weights, and exit.",
    )
    gpus: Optional[int] = setting(
        None, "GPUs the memory plan is for (auto: WORLD_SIZE under torchrun, else 1)."
    )
    gpu_memory_gib: Optional[float] = setting(
        None,
        "Memory of one GPU in GiB for the memory plan (auto: this machine's first GPU, else 79.6, "
        'an "80 GB" H100; a "141 GB" H200 has 140.4).',
    )
    # --- update (the clipped loss and batching are in `update`)
    update: UpdateConfig = setting(
        factory=lambda: UpdateConfig(loss_agg=None, mini_batch_prompts=None),
        help="The clipped update (flags --clip-low ... --micro-batch-tokens).",
    )
    advantage: str = setting(
        "soft", "'soft' (GRPO on the leaves, the reference's default) or 'hard' (shared tokens get the mean)."
    )
    lr: Optional[float] = setting(
        None,
        "AdamW learning rate (auto: the reference's 1e-6, or the demo's 1e-4 with "
        "--model demo: a 0.6M-parameter model barely moves at 1e-6; with lora_rank 10x those).",
    )
    weight_decay: float = setting(0.01, "AdamW's decoupled weight decay (the reference's: 0.01).")
    # --- LoRA (lora.py): a frozen base with small trained adapters
    lora_rank: int = setting(
        0,
        "Train LoRA adapters of this rank on a frozen base (pip install 'arpo_fast[lora]'); 0: "
        "train every weight. The engine applies the live adapters in the rollout, and the KL "
        "reference is the base (the adapters switched off), with no second copy.",
    )
    lora_alpha: Optional[float] = setting(
        None, "The adapters' output is scaled by lora_alpha / lora_rank (auto: the rank, a scale of 1)."
    )
    lora_dropout: float = setting(
        0.0, "Dropout on the adapters' input in the update's forward (never in the rollout); in [0, 1)."
    )
    lora_targets: str = setting(
        ",".join(LORA_TARGETS),
        "Comma-separated projections that get adapters (default: every linear layer of attention and MLP).",
    )
    save_merged: bool = setting(
        False,
        "With lora_rank: each checkpoint also holds merged/, the base with the adapters merged in, "
        "a plain model that AutoModelForCausalLM loads (the size of the base).",
    )

    def __post_init__(self):
        if not (math.isfinite(self.dist_timeout_s) and self.dist_timeout_s >= 0):
            raise ValueError(f"dist_timeout_s must be >= 0, got {self.dist_timeout_s}")
        for name in ("setup_timeout_s", "rollout_timeout_s", "update_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        self.resume = _resume_mode(self.resume)
        require_counts(self, "steps", "tool_workers")
        require_non_negative(
            self,
            "demo_warm_start",
            "max_calls",
            "save_every",
            "top_k",
            "weight_decay",
            "eval_every",
            "plot_every",
        )
        if self.eval_samples is not None:
            require_non_negative(self, "eval_samples")
        require_counts(self, "hsdp_replicas")
        if self.gpu_memory_gib is not None and not (
            math.isfinite(self.gpu_memory_gib) and self.gpu_memory_gib > 0
        ):
            raise ValueError(f"gpu_memory_gib must be > 0 (or auto), got {self.gpu_memory_gib}")
        for name in ("eval_limit", "kv_memory_mb", "cpu_threads", "gpus", "prompts_per_step"):
            if getattr(self, name) is not None:
                require_counts(self, name)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0 (or auto), got {self.lr}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be > 0 (the update needs the sampled distribution's "
                f"log-probs), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.eval_temperature is not None and not (
            math.isfinite(self.eval_temperature) and self.eval_temperature > 0
        ):
            raise ValueError(
                f"eval_temperature must be > 0 (greedy pass@1 is always evaluated), "
                f"got {self.eval_temperature}"
            )
        unknown = [t for t in self.report_targets if t not in REPORT_TARGETS]
        if unknown or not self.report_to.strip():
            raise ValueError(
                f"report_to must be none or a comma-separated list of {', '.join(REPORT_TARGETS)}, "
                f"got {self.report_to!r}"
            )
        if self.advantage not in ("soft", "hard"):
            raise ValueError(f"advantage must be 'soft' or 'hard', got {self.advantage!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        self._check_lora()
        if not self.reward_key.strip():
            raise ValueError("reward_key must name a data column, e.g. data_source")
        if self.resume is not False and not self.out:
            raise ValueError("resume needs --out, the directory of the run to continue")
        self._resolve_auto()

    def _check_lora(self) -> None:
        """The LoRA settings, each error naming its flag (``lora.LoraSettings`` checks them again)."""
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an integer >= 0 (0: off), got {self.lora_rank!r}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be > 0 (or auto), got {self.lora_alpha}")
        if not (math.isfinite(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = [t.strip() for t in self.lora_targets.split(",")]
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"lora_targets has an unknown projection {unknown[0]!r}; choose from {','.join(LORA_TARGETS)}"
            )
        if len(set(targets)) != len(targets):
            raise ValueError(f"lora_targets names a projection twice: {self.lora_targets!r}")
        if self.save_merged and not self.lora_rank:
            raise ValueError(
                "save_merged needs --lora-rank (without LoRA the checkpoint is the model itself)"
            )

    def _resolve_auto(self) -> None:
        """The one place where ``auto`` (None) settings get their value for this job; the names of
        those that did are kept in ``auto_settings`` (flag-level names, the fields of ``rollout``
        and ``update`` included). A real model gets the job settings of the reference's 7B
        reasoning script (prompts per step, response length, learning rate); the demo its own,
        never inherited by a run on a model or data of its own (nor are its held-out set and
        thread count). ``tokenizer``, ``kv_memory_mb`` and ``eval_limit`` stay None: the model's
        tokenizer, the engine's pool size and every held-out prompt."""
        self.auto_settings = frozenset(name for name, value in self.flat().items() if value is None)
        demo = is_demo(self.model)
        if self.lr is None:
            if self.lora_rank:
                self.lr = DEMO_LORA_LR if demo else LORA_LR
            else:
                self.lr = DEMO_LR if demo else REFERENCE_LR
        if self.prompts_per_step is None:
            self.prompts_per_step = DEMO_PROMPTS if demo else REFERENCE_PROMPTS
        if self.rollout.max_response_tokens is None:
            response = DEMO_RESPONSE if demo else REFERENCE_RESPONSE
            self.rollout = dataclasses.replace(self.rollout, max_response_tokens=response)
        if self.rollout.branch_budget is None:
            pooled = "pooled" if self.rollout.pooled else "split"
            self.rollout = dataclasses.replace(self.rollout, branch_budget=pooled)
        if self.update.loss_agg is None:
            agg = "dynamic-bsz" if self.rollout.arpo_semantics == "reference" else "token-mean"
            self.update = dataclasses.replace(self.update, loss_agg=agg)
        if self.eval_data is None:
            self.eval_data = DEMO if is_demo(self.data) else "none"
        if self.test_data is None:  # with the held-out evaluation: a run without one has no test
            self.test_data = DEMO if is_demo(self.data) and self.eval_data != "none" else "none"
        if self.eval_samples is None:
            self.eval_samples = DEMO_EVAL_SAMPLES if is_demo(self.data) else 0
        if self.eval_temperature is None:
            self.eval_temperature = self.temperature
        if self.update.mini_batch_prompts is None:
            self.auto_settings |= {"mini_batch_prompts"}
            per = DEMO_MINI_BATCH if is_demo(self.model) else REFERENCE_MINI_BATCH
            self.update = dataclasses.replace(self.update, mini_batch_prompts=per)
        if self.cpu_threads is None and is_demo(self.model) and "OMP_NUM_THREADS" not in os.environ:
            self.cpu_threads = threads()
        if self.out is None:
            self.out = time.strftime("runs/arpo-%Y%m%d-%H%M%S")

    @classmethod
    def from_flat(cls, **settings) -> TrainConfig:
        """A config from flag-level names: the fields of ``rollout`` and ``update`` sit beside the
        others (``TrainConfig.from_flat(rollouts=4, clip_low=0.1, steps=2)``)."""
        groups: dict[str, dict] = {name: {} for name in GROUPS}
        top = {}
        for key, value in settings.items():
            group = next((g for g, c in GROUPS.items() if key in names_of(c)), None)
            (groups[group] if group else top)[key] = value
        for group, sub in groups.items():
            if sub:  # onto the unresolved defaults: auto settings then resolve for this job
                top[group] = dataclasses.replace(_group_default(group), **sub)
        return cls(**top)

    def flat(self) -> dict:
        """The settings by flag-level name (``from_flat``'s inverse)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in GROUPS}
        for group in GROUPS:
            values |= dataclasses.asdict(getattr(self, group))
        return values

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tools.split(",") if t.strip())

    @property
    def report_targets(self) -> tuple[str, ...]:
        """Where the metrics also go (``report_to`` as a tuple; none: empty)."""
        names = tuple(t.strip() for t in self.report_to.split(",") if t.strip())
        return () if names == ("none",) else names


GROUPS = {"rollout": ARPOConfig, "update": UpdateConfig}
"""The fields of TrainConfig that hold settings classes of their own, flattened into flags."""


def _group_default(group: str):
    """The settings class ``group`` of a TrainConfig before any auto setting resolves."""
    return next(f for f in fields(TrainConfig) if f.name == group).default_factory()


def names_of(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def _resume_mode(value) -> Optional[bool]:
    """``resume``: True, False or None (auto), from a bool, None or their spellings."""
    if value is None or isinstance(value, bool):
        return value
    spelled = bool_of(str(value))
    if spelled is not None:
        return spelled
    if str(value).lower() == "auto":
        return None
    raise ValueError(f"resume: expected true, false or auto, got {value!r}")
