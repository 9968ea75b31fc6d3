"""LoRA policies: a frozen base model with small trainable adapters, created and saved with ``peft``.

The base keeps the dtype it was loaded in (bf16 on a GPU, what the caller chose on the CPU) and is
frozen. Each adapted projection gets A [r, in] and B [out, r] in fp32, so AdamW steps them directly
with no master copy; B starts at zero, so the policy starts as the base model. The model stays the
``transformers`` model the rest of arpo_fast uses: ``peft`` swaps its projections for LoRA layers in
place, so its forward (the update's) applies the adapters, and the rollout engine applies the same
adapters inside its own forward (``arpo_fast/engine/lora.py``).

- :func:`add_lora` adds the adapters; :func:`adapter_parameters` lists what trains.
- :func:`adapters_disabled`: the base model again for a block (the KL reference), with no copy.
- :func:`adapter_dropout`: the adapters' dropout acts for a block, even in eval mode.
- ``arpo_fast.train.lora_files``: the adapter in PEFT's format, and the merged model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from arpo_fast.engine.lora import PROJECTIONS, LoraLayer, is_lora_layer

DEFAULT_TARGETS = PROJECTIONS
"""Every linear layer of attention (q, k, v, o) and of the MLP (gate, up, down)."""

ADAPTER = "default"
"""The adapter's name inside ``peft`` (its default): one adapter per model."""


@dataclass(frozen=True)
class LoraSettings:
    """What :func:`add_lora` adds. ``targets`` may be given as a comma-separated string."""

    rank: int
    """r: the adapters' inner dimension (>= 1)."""
    alpha: float | None = None
    """The adapters' output is scaled by alpha / rank; None: alpha = rank (a scale of 1)."""
    dropout: float = 0.0
    """Dropout on each adapter's input, in [0, 1). As in ``peft`` it acts in training mode only; the
    trainer keeps the model in eval mode, so it acts inside :func:`adapter_dropout` only."""
    targets: Sequence[str] = DEFAULT_TARGETS
    """Projections to adapt, a subset of ``DEFAULT_TARGETS``."""

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be an int >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        targets = tuple(t.strip() for t in targets)
        unknown = [t for t in targets if t not in DEFAULT_TARGETS]
        if unknown or not targets:
            given = ", ".join(unknown) or "none given"
            raise ValueError(f"lora targets: {given}; expected some of {','.join(DEFAULT_TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"lora targets: {','.join(targets)} names a projection twice")
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        """alpha / rank: what the adapters' output is multiplied by."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def import_peft():
    """``peft``, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'arpo_fast[lora]'") from None
    return peft


def add_lora(model: torch.nn.Module, settings: LoraSettings, seed: int | None = None) -> torch.nn.Module:
    """Freeze ``model`` (a ``transformers`` causal LM) and add LoRA adapters to its ``settings.targets``
    projections, in place; returns ``model``. The adapters are fp32 on the model's device whatever
    the base dtype; A is drawn from ``seed`` when given (else from torch's global generator), B is 0.
    """
    peft = import_peft()
    if getattr(model, "peft_config", None) or any(is_lora_layer(m) for m in model.modules()):
        raise ValueError("add_lora: the model already has adapters")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.targets if t not in names]
    if missing:
        raise ValueError(f"lora targets: the model has no {', '.join(missing)} layers")
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.requires_grad_(False)
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        if seed is not None:
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(seed)
        # transformers deprecates an attribute that peft still reads; not the user's concern.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft.get_peft_model(model, config, adapter_name=ADAPTER)  # injects into ``model`` itself
    for _, p in adapter_parameters(model):
        if p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(True)
    for _, layer in lora_layers(model):  # peft creates them in training mode: dropout would act
        layer.train(model.training)
    return model


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """The LoRA layers of ``model`` by qualified name (``model.layers.0.self_attn.q_proj``)."""
    return [(name, m) for name, m in model.named_modules() if is_lora_layer(m)]


def adapter_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapters' A and B (and B's bias where it has one) by name: what the optimizer steps."""
    ids = {
        id(p)
        for _, layer in lora_layers(model)
        for attr in ("lora_A", "lora_B")
        for p in getattr(layer, attr).parameters()
    }
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block (every adapter off): the KL reference
    without a second copy. Nests; the adapters' state and ``requires_grad`` flags come back on exit,
    also after an exception. The rollout engine is not affected (it applies the adapters itself)."""
    layers = [m for _, m in lora_layers(model)]
    flags = [(p, p.requires_grad) for _, p in adapter_parameters(model)]
    was_disabled = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)
        for p, requires_grad in flags:  # peft's toggle sets them; put back the caller's
            p.requires_grad_(requires_grad)


def _dropout_modules(model: torch.nn.Module, fn) -> list[bool]:
    """Apply ``fn`` to every adapter's dropout module; returns their training flags before."""
    before = []
    for _, layer in lora_layers(model):
        for m in layer.lora_dropout.values():
            before.append(m.training)
            fn(m)
    return before


@contextlib.contextmanager
def adapter_dropout(model: torch.nn.Module) -> Iterator[None]:
    """Let the adapters' dropout (``LoraSettings.dropout``) act inside the block, whatever the
    model's training mode; the modules' modes come back on exit. The engine never applies dropout."""
    before = _dropout_modules(model, lambda m: m.train())
    try:
        yield
    finally:
        modules = [m for _, layer in lora_layers(model) for m in layer.lora_dropout.values()]
        for m, training in zip(modules, before):
            m.train(training)
