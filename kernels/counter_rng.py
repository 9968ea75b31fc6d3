"""Counter-based uniforms for the sampler, written identically in Triton and in PyTorch.

A row's uniform is a function of (seed, position) only: two 32-bit hashes of the words
(stream, seed lo, seed hi, pos lo, pos hi), each word xor-ed in and followed by MurmurHash3's
finaliser (a bijection on 32 bits with full avalanche), give 27 + 26 = 53 random bits. All values
stay in [0, 2^32) inside int64; a 32-bit multiply is split into 16-bit halves so no intermediate
overflows int64 (wrap-around on overflow is not something to rely on in either language).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_M32 = 0xFFFFFFFF


@triton.jit
def uniform53(seed, pos):
    """A float64 uniform in [0, 1) with 53 random bits, a function of (seed, position) only.

    Two 32-bit hashes (streams 1 and 2, computed side by side in a [2] block) of the words
    (stream, seed lo, seed hi, pos lo, pos hi), each word xor-ed in and followed by MurmurHash3's
    finaliser (a bijection on 32 bits with full avalanche). Written inline, without helper calls:
    Triton's interpreter pays milliseconds per nested jit call, and this runs once per row.
    """
    lane = tl.arange(0, 2)
    h = ((lane + 1).to(tl.int64) * 0x9E3779B9) & 0xFFFFFFFF
    for r in tl.static_range(5):
        if r == 0:
            word = 0
        elif r == 1:
            word = seed & 0xFFFFFFFF
        elif r == 2:
            word = (seed >> 32) & 0xFFFFFFFF
        elif r == 3:
            word = pos & 0xFFFFFFFF
        else:
            word = (pos >> 32) & 0xFFFFFFFF
        h = h ^ word
        h = h ^ (h >> 16)
        # h * 0x85EBCA6B mod 2^32, split in 16-bit halves so nothing overflows int64.
        h = (h * 0xCA6B + (((h * 0x85EB) & 0xFFFF) << 16)) & 0xFFFFFFFF
        h = h ^ (h >> 13)
        h = (h * 0xAE35 + (((h * 0xC2B2) & 0xFFFF) << 16)) & 0xFFFFFFFF
        h = h ^ (h >> 16)
    a = tl.sum(tl.where(lane == 0, h, 0), 0)
    b = tl.sum(tl.where(lane == 1, h, 0), 0)
    bits = (a >> 5) * 67108864 + (b >> 6)  # 27 + 26 bits
    return bits.to(tl.float64) * 1.1102230246251565e-16  # 2^-53


def _mul32_ref(h: torch.Tensor, c: int) -> torch.Tensor:
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32_ref(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32_ref(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32_ref(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _hash32_ref(seed: torch.Tensor, pos: torch.Tensor, stream: int) -> torch.Tensor:
    h = torch.full_like(seed, (stream * 0x9E3779B9) & _M32)
    for word in (0, seed & _M32, (seed >> 32) & _M32, pos & _M32, (pos >> 32) & _M32):
        h = _fmix32_ref(h ^ word)
    return h


def uniform53_ref(seed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The sampler's uniforms. seed, pos: int64 [B]. Returns float64 [B] in [0, 1)."""
    a = _hash32_ref(seed, pos, 1)
    b = _hash32_ref(seed, pos, 2)
    return ((a >> 5) * 67108864 + (b >> 6)).to(torch.float64) * 2.0**-53
