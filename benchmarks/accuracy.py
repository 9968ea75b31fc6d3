"""Relative errors of a result against a more exact one: what the report's accuracy rows and the
kernel and engine tests measure. The tests import this module (benchmarks run as scripts and
cannot import ``tests/``)."""

from __future__ import annotations

import torch


def rel_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    """||x - exact|| / ||exact||, L2 over all entries in float64 (``exact`` is float64): steadier
    than a max over a few dozen elements."""
    return ((x.double() - exact).norm() / exact.norm().clamp_min(1e-12)).item()


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, in the inputs' dtype."""
    return ((x - ref).abs().max() / ref.abs().max()).item()
