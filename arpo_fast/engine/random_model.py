"""Randomly initialised Llama / Qwen2 / Qwen3 causal LMs of a chosen size, for tests, benchmarks and
the demo: nothing is downloaded, and the model is the ``transformers`` class the engine runs on.

``transformers`` is imported when a model is built, not when this module is imported.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

_CLASSES = {  # arch -> (config class, model class) in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
ARCHS = tuple(_CLASSES)


def random_causal_lm(
    arch: str = "qwen2",
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **config: Any,
) -> torch.nn.Module:
    """A ``{Llama,Qwen2,Qwen3}ForCausalLM`` with random weights, in eval mode.

    vocab, hidden, layers, heads, kv_heads: the config's ``vocab_size``, ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads`` and ``num_key_value_heads``; intermediate: the
    MLP width (default 4 * hidden). Every other config field takes the ``transformers`` default
    unless given in ``config`` (e.g. ``tie_word_embeddings=True``, ``eos_token_id=2``, ``head_dim``,
    ``rope_scaling``, ``max_position_embeddings``).

    The weights are drawn after ``torch.manual_seed(seed)``, on ``device`` (default: the current
    default device): the same seed, config and device give the same model. ``dtype`` casts the
    whole model afterwards (the rotary frequencies included).
    """
    if arch not in _CLASSES:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in _CLASSES[arch])
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        **config,
    )
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else nullcontext():
        model = model_cls(cfg)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
