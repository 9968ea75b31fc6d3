"""A LoRA policy on disk: the adapter in PEFT's format, and the base with the adapter merged in.

- :func:`save_adapter` writes ``adapter_config.json`` and ``adapter_model.safetensors`` (fp32), the
  files ``PeftModel.from_pretrained(base, DIR)`` loads; :func:`load_adapter` reads them back into a
  model's adapters in place (the same tensors, so an engine and its CUDA graphs keep working).
- :func:`save_base` writes the base model alone, as ``transformers`` saves it.
- :func:`save_merged` writes a plain ``transformers`` model (``AutoModelForCausalLM.from_pretrained``
  loads it) whose projections are W + scale * B A, computed in fp32 and rounded once to the base
  dtype. The live model is not touched: the merged weights are built one projection at a time and
  moved to the CPU, so the device holds one extra projection at most (the CPU holds them all,
  about the model's size in its dtype, until they are written).

Each writes into a new or empty folder, never over files already there.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from arpo_fast.train.lora import ADAPTER, LoraLayer, lora_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What ``PeftModel`` puts in front of the wrapped model's names in its state dict, and so in the
saved adapter's keys."""


def _adapter_config(model: torch.nn.Module):
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if config is None:
        raise ValueError("the model has no LoRA adapters (add them with add_lora)")
    return config


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under the names PEFT saves them with (``base_model.model.<layer>.lora_A
    .weight``, ...): the live tensors, detached, on their device (no copy)."""
    out = {}
    for name, layer in lora_layers(model):
        a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.weight.detach()
        if b.bias is not None:
            out[f"{PEFT_PREFIX}{name}.lora_B.bias"] = b.bias.detach()
    return out


def _new_folder(directory, what: str) -> Path:
    path = Path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{what}: {path} exists and is not an empty folder; nothing written")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_adapter(model: torch.nn.Module, directory) -> Path:
    """Write the adapter of ``model`` (see :mod:`arpo_fast.train.lora`) into ``directory`` in PEFT's
    format; returns the folder."""
    from safetensors.torch import save_file

    config = copy.deepcopy(_adapter_config(model))
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    tensors = {k: t.to("cpu").contiguous() for k, t in adapter_state_dict(model).items()}
    path = _new_folder(directory, "save_adapter")
    config.save_pretrained(str(path))
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def _read_saved(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The saved config and tensors of an adapter folder, or a one-line error naming the file."""
    from safetensors.torch import load_file

    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise ValueError(f"{f}: missing; {path} is not a saved LoRA adapter")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{config_file}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{weights_file}: cannot read it ({' '.join(str(exc).split())[:200]})") from None
    return config, tensors


def load_adapter(model: torch.nn.Module, directory) -> None:
    """Copy a saved adapter (:func:`save_adapter`, or ``PeftModel.save_pretrained``) into the adapters
    of ``model`` in place. Everything is checked first (rank, alpha, targets, every tensor's name and
    shape): on a mismatch nothing is changed and the error names the file."""
    path = Path(directory)
    saved_config, tensors = _read_saved(path)
    ours = _adapter_config(model)
    checks = (
        ("peft_type", saved_config.get("peft_type"), "LORA"),
        ("r", saved_config.get("r"), ours.r),
        ("lora_alpha", saved_config.get("lora_alpha"), ours.lora_alpha),
        ("target_modules", sorted(saved_config.get("target_modules") or []), sorted(ours.target_modules)),
    )
    for key, got, want in checks:
        if got != want:
            raise ValueError(f"{path / CONFIG_FILE}: {key} is {got!r}, the model's adapters have {want!r}")
    live = adapter_state_dict(model)
    missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ValueError(f"{path / WEIGHTS_FILE}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
    for key, t in live.items():
        if tensors[key].shape != t.shape:
            raise ValueError(
                f"{path / WEIGHTS_FILE}: {key} has shape {list(tensors[key].shape)}, expected {list(t.shape)}"
            )
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(tensors[key])


def merged_weight(layer: LoraLayer) -> torch.Tensor:
    """W + scale * B A (and the merged bias, where B has one) of one LoRA layer, in fp32 then
    rounded once to W's dtype, on W's device: a new tensor, the layer unchanged."""
    base = layer.get_base_layer()
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    scale = layer.scaling[ADAPTER]
    with torch.no_grad():
        return (base.weight.float() + (b.float() @ a.float()) * scale).to(base.weight.dtype)


def merged_state_dict(model: torch.nn.Module, merge: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of the model with its adapters merged (``merge``; else the base model's own),
    under the plain ``transformers`` names: merged projections on the CPU, every other tensor the
    live one (not copied)."""
    layers = dict(lora_layers(model))
    for name, layer in layers.items():
        if merge and layer.lora_B[ADAPTER].bias is not None:
            raise ValueError(f"save_merged: {name} has an adapter bias, which merging does not support")
    out = {}
    for key, t in model.state_dict().items():
        owner, rest = _owner(key, layers)
        if owner is None:
            out[key] = t
        elif rest.startswith("base_layer."):  # the adapters' own tensors are left out
            out[f"{owner}.{rest[len('base_layer.') :]}"] = t
    if merge:
        for name, layer in layers.items():
            out[f"{name}.weight"] = merged_weight(layer).cpu()
    return out


def _owner(key: str, layers: dict) -> tuple[str | None, str]:
    """(the LoRA layer a state-dict key belongs to, the rest of the key), or (None, key)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix, ".".join(parts[i:])
    return None, key


def save_merged(model: PreTrainedModel, directory, merge: bool = True) -> Path:
    """Write ``model`` with its adapters merged as a plain ``transformers`` model (config, generation
    config and safetensors weights, in the base's dtype) into ``directory``; returns the folder.
    ``merge=False`` writes the base model (the adapters left out; :func:`save_base`). ``model``
    itself is left as it is."""
    _adapter_config(model)
    state = merged_state_dict(model, merge)
    path = _new_folder(directory, "save_merged" if merge else "save_base")
    live = model.config
    model.config = copy.deepcopy(live)  # save_pretrained records the class and dtype in it
    try:
        model.save_pretrained(str(path), state_dict=state)
    finally:
        model.config = live
    return path


def save_base(model: PreTrainedModel, directory) -> Path:
    """Write the frozen base of ``model`` (its adapters left out) as a plain ``transformers`` model
    into ``directory``: what ``add_lora`` was given, for a base that exists nowhere else (the
    demo's, after its warm start)."""
    return save_merged(model, directory, merge=False)
