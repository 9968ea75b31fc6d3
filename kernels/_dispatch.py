"""Device dispatch shared by the kernels: Triton on CUDA, the PyTorch reference elsewhere."""

import operator
import os

import torch


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel should run its Triton path for a tensor on this device."""
    if t.is_cuda:
        return True
    return interpret_mode() and t.device.type == "cpu"


# Launch arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions whose host-side call costs microseconds each, which adds up on every eager launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_arg(value, B: int, dtype: torch.dtype, device: torch.device):
    """A per-row kernel argument: (contiguous tensor [B] of dtype, None) for a tensor of shape [B]
    or [] (broadcast), or (None, value) for a Python number, passed as a scalar."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(B).contiguous(), None
    return None, value


def vocab_in_use(V: int, vocab_limit) -> int:
    """How many of V vocabulary entries a distribution covers: min(V, vocab_limit), or V for None.
    ``vocab_limit`` (an int >= 1) is the tokenizer's size where an output layer has rows past it."""
    if vocab_limit is None:
        return V
    try:
        limit = None if isinstance(vocab_limit, bool) else operator.index(vocab_limit)
    except TypeError:
        limit = None
    if limit is None or limit < 1:
        raise ValueError(f"vocab_limit must be an int >= 1 or None, got {vocab_limit!r}")
    return min(V, limit)
