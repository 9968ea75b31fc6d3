"""Tiny random Llama / Qwen2 / Qwen3 models from configs, shared by the engine tests (fp32, CPU).

The initializer range is wider than the default so that logits are spread out and greedy decoding
has no near-ties that float rounding could flip.
"""

import os
from contextlib import contextmanager

import torch

ARCHS = ["llama", "qwen2", "qwen3"]
VOCAB = 300


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                  "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "llama":  # Llama-3 rope scaling, untied head, attention bias off
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}
        common.setdefault("rope_scaling", rope)
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    elif arch == "qwen2":  # qkv bias, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    elif arch == "qwen3":  # q/k norms, explicit head_dim different from hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, tie_word_embeddings=False, **common))
    else:
        raise ValueError(arch)
    return model.eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 logits of the plain HF forward."""
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    dev = model.device
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=dev),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


@contextmanager
def pytorch_kernels():
    """Run the kernels' PyTorch references instead of the interpreted Triton kernels (what CPU tensors
    use outside tests): the interpreter costs about a second per decode step."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
