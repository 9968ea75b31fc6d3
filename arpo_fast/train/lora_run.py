"""A LoRA run (``--lora-rank``): the trainer's side of ``lora.py`` and ``lora_files.py``.

- Setup: the base is loaded (the demo's after its warm start), then :func:`attach` freezes it and
  adds the adapters (a resumed run then loads its checkpoint's); the optimizer steps the adapters
  only, and the engine, built after, applies them in the rollout.
- The update: :class:`AdapterPolicy` is the policy (the adapters' dropout acts in its forwards
  that build gradients, never in the rollout or the recomputed old log-probs), and
  :class:`BaseKLModel` is the KL model, the same model with its adapters switched off.
- Checkpoints (:func:`write`): ``adapter/`` holds the adapter in PEFT's format and the tokenizer;
  ``base/`` the demo's base (it exists nowhere else: it was built and warm-started in the run),
  while a run on ``--model DIR`` loads its base from there again; ``merged/`` (``--save-merged``)
  the base with the adapter merged in, a plain model. The trainer state is as in a full run.

Under torchrun (``sharded_policy.ShardedPolicy`` with ``lora``) FSDP2 shards the frozen base and the
adapters, AdamW steps the adapter shards, and each rank's rollout copy gets the gathered adapters
once a step; its base never changes and stays whole on every rank, so the KL reference runs on it
with no communication. Rank 0 writes ``adapter/`` (from its rollout copy), DCP the adapters' fp32
shards and AdamW state (not the base).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from arpo_fast.seeds import child_seed
from arpo_fast.train.batch import LogprobModel
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.demo import is_demo

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER_DIR, BASE_DIR, MERGED_DIR = "adapter", "base", "merged"


def settings(cfg: TrainConfig):
    """The run's ``lora.LoraSettings``, or None without ``--lora-rank``."""
    if not cfg.lora_rank:
        return None
    from arpo_fast.train.lora import LoraSettings

    return LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


def is_lora_checkpoint(path: Path) -> bool:
    return (Path(path) / ADAPTER_DIR).is_dir()


def check(cfg: TrainConfig, distributed: bool, checkpoint: Optional[Path]) -> None:
    """Fail before anything loads, naming the flag: peft missing, or a checkpoint to resume that
    was written with LoRA where this run has none (or the reverse)."""
    if cfg.lora_rank:
        from arpo_fast.train.lora import import_peft

        try:
            import_peft()
        except ImportError as exc:
            raise ValueError(f"--lora-rank: {exc}") from None
    if checkpoint is not None and is_lora_checkpoint(checkpoint) != bool(cfg.lora_rank):
        what = "a LoRA adapter" if cfg.lora_rank == 0 else "a full model, no LoRA adapter"
        raise ValueError(f"--lora-rank {cfg.lora_rank}: the checkpoint {checkpoint} holds {what}")


def base_folder(checkpoint: Path, cfg: TrainConfig) -> Path:
    """Where a LoRA checkpoint's base model is: its ``base/`` (the demo's), else ``--model``."""
    saved = Path(checkpoint) / BASE_DIR
    return saved if saved.is_dir() or is_demo(cfg.model) else Path(cfg.model)


def attach(model: torch.nn.Module, cfg: TrainConfig, checkpoint: Optional[Path]) -> None:
    """With ``--lora-rank``: freeze ``model`` and add its adapters (A drawn from ``--seed``); a
    resumed run's adapters are then read from ``checkpoint`` (every name and shape checked)."""
    lora = settings(cfg)
    if lora is None:
        return
    from arpo_fast.train.checkpoint import CheckpointError
    from arpo_fast.train.lora import add_lora
    from arpo_fast.train.lora_files import load_adapter

    try:
        add_lora(model, lora, seed=cfg.seed)
    except ValueError as exc:  # a target the model lacks
        raise ValueError(f"--lora-targets: {exc}") from None
    if checkpoint is not None:
        try:
            load_adapter(model, Path(checkpoint) / ADAPTER_DIR)
        except ValueError as exc:
            raise CheckpointError(f"cannot resume from {checkpoint}: {exc}") from None


DROPOUT_STREAM = 1 << 40
"""The child index of a step's seed that the dropout masks are drawn from (the rollout's prompts
use the small indices)."""


class AdapterPolicy(LogprobModel):
    """The LoRA policy as the update runs it: the adapters' dropout (``--lora-dropout``) acts in the
    forwards that build gradients only. Each forward sets the dropout modules' mode and leaves it
    so: a checkpointed layer (``--gradient-checkpointing``) recomputes its forward during backward,
    after this call has returned, and must draw the same masks (torch restores the RNG state for
    it). The rollout never applies dropout, whatever the mode.

    After :meth:`seed_dropout` the masks are a function of (seed, gradient forwards since): each
    such forward runs on torch's generators forked and seeded from them, and the global ones are
    left as they were. :func:`seed_dropout` seeds from (``--seed``, step, rank), so a resumed run
    draws the masks an uninterrupted one draws, with no RNG state in the checkpoint."""

    def __init__(self, policy: torch.nn.Module, vocab_limit: Optional[int] = None):
        from arpo_fast.train.lora import lora_layers

        super().__init__(policy, vocab_limit)
        self.dropout = [m for _, layer in lora_layers(policy) for m in layer.lora_dropout.values()]
        self.dropout_seed: Optional[int] = None
        self.dropout_draws = 0

    def seed_dropout(self, seed: int) -> None:
        self.dropout_seed, self.dropout_draws = seed, 0

    def forward(self, batch, temperature: float, attention: str = "sdpa", context=None):
        grad = torch.is_grad_enabled()
        for m in self.dropout:
            m.train(grad)
        if not grad or self.dropout_seed is None or not any(getattr(m, "p", 0) for m in self.dropout):
            return super().forward(batch, temperature, attention, context)
        seed = child_seed(self.dropout_seed, self.dropout_draws)
        self.dropout_draws += 1
        device = next(self.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return super().forward(batch, temperature, attention, context)


def seed_dropout(scorer: torch.nn.Module, cfg: TrainConfig, step: int, rank: int) -> None:
    """Before step ``step``'s update (0-based): its dropout masks from (``--seed``, step, rank)."""
    if isinstance(scorer, AdapterPolicy) and cfg.lora_dropout:
        scorer.seed_dropout(child_seed(child_seed(child_seed(cfg.seed, step), DROPOUT_STREAM), rank))


class BaseKLModel(LogprobModel):
    """The KL model of a LoRA run: the policy's own model with its adapters off (the frozen
    base, the policy the run started from), no second copy of the weights."""

    def forward(self, batch, temperature: float, attention: str = "sdpa", context=None):
        from arpo_fast.train.lora import adapters_disabled

        with adapters_disabled(self.policy):
            return super().forward(batch, temperature, attention, context)


def scorer(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """What the update runs as the policy: ``model``, or :class:`AdapterPolicy` around it."""
    return AdapterPolicy(model) if cfg.lora_rank else model


def kl_model(model: torch.nn.Module, cfg: TrainConfig) -> Optional[BaseKLModel]:
    """The KL model of a LoRA run with ``--kl-coef`` (None otherwise)."""
    return BaseKLModel(model) if cfg.lora_rank and cfg.update.kl_coef else None


def files(cfg: TrainConfig) -> Optional[dict]:
    """What a LoRA run's checkpoint holds besides the adapter (None: not a LoRA run)."""
    if not cfg.lora_rank:
        return None
    return {"base": is_demo(cfg.model), "merged": cfg.save_merged}


def write(folder: Path, model: PreTrainedModel, tokenizer, base: bool, merged: bool) -> None:
    """The model part of a LoRA checkpoint in ``folder``: ``adapter/`` (PEFT's files and the
    tokenizer), ``base/`` with ``base``, ``merged/`` with ``merged`` (each a model and tokenizer
    that ``AutoModelForCausalLM``/``AutoTokenizer`` load)."""
    from arpo_fast.train.lora_files import save_adapter, save_base, save_merged

    save_adapter(model, folder / ADAPTER_DIR)
    tokenizer.save_pretrained(folder / ADAPTER_DIR)
    for wanted, name, save in ((base, BASE_DIR, save_base), (merged, MERGED_DIR, save_merged)):
        if wanted:
            with warnings.catch_warnings():  # transformers deprecates an attribute peft's layers read
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
                )
                save(model, folder / name)
            tokenizer.save_pretrained(folder / name)


def required_parts(path: Path) -> list[tuple[str, str]]:
    """(file, what it is) that a LoRA checkpoint must hold, for ``checkpoint.validate_checkpoint``."""
    parts = [
        (f"{ADAPTER_DIR}/adapter_config.json", "the adapter's config"),
        (f"{ADAPTER_DIR}/adapter_model.safetensors", "the adapter's weights"),
        (f"{ADAPTER_DIR}/tokenizer_config.json", "the tokenizer"),
    ]
    if (Path(path) / BASE_DIR).exists():
        parts.append((f"{BASE_DIR}/config.json", "the base model's config"))
    return parts
