"""The training run's settings as one dataclass.

Every field is a ``--kebab-case`` flag whose help text the field carries (``arpo_fast.settings``),
the fields of the tree rollout's ``ARPOConfig`` and the update's ``UpdateConfig`` included; the
defaults are the built-in demo's (see ``demo.py``), with the reference's algorithm settings. The
command line is built from these fields in ``cli.py``; ``run_config.py`` reads and writes them as
YAML (``--config FILE``, the run folder's ``config.yaml``).

A config checks its settings when it is built (``config_checks.py``). A setting whose default
depends on the job is ``None`` here, shown and written as ``auto``, and resolved in one place,
:func:`arpo_fast.train.config_auto.resolve_auto`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Optional

from arpo_fast.rollout.config import ARPOConfig
from arpo_fast.settings import setting
from arpo_fast.train.config_auto import resolve_auto
from arpo_fast.train.config_checks import LORA_TARGETS, check
from arpo_fast.train.update_config import UpdateConfig


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

    def __post_init__(self) -> None:
        self.auto_settings: frozenset[str] = frozenset()  # not a field: resolve_auto sets it
        check(self)  # config_checks.py: each bad value's error names its setting
        resolve_auto(self)  # config_auto.py: the job's values of the auto settings

    @classmethod
    def from_flat(cls, **settings) -> TrainConfig:
        """A config from flag-level names: the fields of ``rollout`` and ``update`` sit beside the
        others (``TrainConfig.from_flat(rollouts=4, clip_low=0.1, steps=2)``)."""
        groups: dict[str, dict] = {name: {} for name in GROUPS}
        top: dict[str, Any] = {}
        for key, value in settings.items():
            group = next((g for g, c in GROUPS.items() if key in names_of(c)), None)
            (groups[group] if group else top)[key] = value
        for group, sub in groups.items():
            if sub:  # onto the unresolved defaults: auto settings then resolve for this job
                top[group] = dataclasses.replace(group_default(group), **sub)
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


def group_default(group: str):
    """The settings class ``group`` of a TrainConfig before any auto setting resolves."""
    factory = next(f for f in fields(TrainConfig) if f.name == group).default_factory
    assert factory is not dataclasses.MISSING, f"TrainConfig.{group} has a default factory"
    return factory()


def names_of(cls) -> set[str]:
    return {f.name for f in fields(cls)}
