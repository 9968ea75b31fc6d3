"""GPU report section: blocked log-prob/entropy vs the plain PyTorch path (and Liger where installed).

Full size is Qwen2.5-7B's LM head (H = 3584, V = 152064) over T = 16384 bf16 tokens, forward +
backward through both outputs with random upstream gradients. "Peak extra memory" is
``torch.cuda.max_memory_allocated()`` during one forward + backward minus what was allocated before
it (the inputs); it includes the gradients produced (grad_weight alone is 1.09 GB here, the same for
every path). ``rows(smoke=True)`` runs tiny sizes on any machine (under the Triton interpreter on a
CPU) to check that the script works.
"""

from __future__ import annotations

import functools
import gc
import math

import torch
from accuracy import rel_err
from report import Row, bench_us
from report import load_kernels as _kernels

SECTION = "logprob_entropy"
TEMPERATURE = 0.7


def _inputs(T, H, V, dtype, device):
    """hidden [T, H] and weight [V, H] (both requiring grad), targets [T], upstream grads fp32 [T]."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=g) * (3.0 / math.sqrt(H))).to(dtype)
    weight.requires_grad_()
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    targets[0], targets[-1] = 0, V - 1
    grads = (torch.randn(T, device=device, generator=g), torch.randn(T, device=device, generator=g))
    return hidden, weight, targets, grads


def _step(fn, hidden, weight, targets, grads, **kw):
    """One forward + backward; returns (logprobs, entropy, grad_hidden, grad_weight)."""
    lp, ent = fn(hidden, weight, targets, **kw)
    gh, gw = torch.autograd.grad((lp, ent), (hidden, weight), grads)
    return lp.detach(), ent.detach(), gh, gw


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _peak_extra_gb(run) -> float:
    """Peak bytes allocated during ``run()`` above what was allocated before it, in GB (1e9)."""
    _free()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    _free()
    return peak / 1e9


def _peers(kernels):
    """name -> callable(hidden, weight, targets, grads) doing forward + backward."""
    peers = {
        "ours": lambda h, w, t, g: _step(kernels.logprob_entropy, h, w, t, g, temperature=TEMPERATURE),
        "PyTorch": lambda h, w, t, g: _step(kernels.logprob_entropy_ref, h, w, t, g, temperature=TEMPERATURE),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        # Liger's fused linear cross entropy gives a loss only (no per-token log-probs, no entropy):
        # a lower bound on the work, compared for time and memory alone.
        flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger(h, w, t, g):
            loss = flce(w, h, t)
            return torch.autograd.grad(loss, (h, w))

        peers["Liger FLCE (loss only)"] = liger
    except Exception as exc:  # not installed, or an incompatible version: the section goes on
        print(f"(logprob_entropy: Liger-Kernel unavailable: {type(exc).__name__}: {exc})")
    return peers


def _speed_rows(kernels, T, H, V, dtype, device) -> list[Row]:
    """Time and peak extra memory of each peer, forward + backward, at one size."""
    hidden, weight, targets, grads = _inputs(T, H, V, dtype, device)
    case = f"T={T} H={H} V={V} {str(dtype).replace('torch.', '')} fwd+bwd"
    results, errors = {}, {}
    for name, fn in _peers(kernels).items():
        try:
            run = functools.partial(fn, hidden, weight, targets, grads)
            us = bench_us(run, warmup=1, reps=3)
            gb = _peak_extra_gb(run) if device == "cuda" else None
            results[name] = (us / 1000.0, gb)
        except Exception as exc:  # e.g. the plain path running out of memory: report, go on
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            print(f"(logprob_entropy: {name} failed at {case}: {errors[name]})")
        _free()
    rows = []
    ours = results.get("ours")
    if ours is None:
        raise RuntimeError(f"our kernel failed at {case}: {errors.get('ours')}")
    for name, (ms, gb) in results.items():
        if name == "ours":
            continue
        # The time target is judged on a GPU only: under the CPU interpreter timings mean nothing.
        is_plain = name == "PyTorch" and device == "cuda"
        rows.append(
            Row(
                SECTION,
                case,
                "time ms",
                ours[0],
                name,
                ms,
                "<= PyTorch" if is_plain else "",
                (ours[0] <= ms) if is_plain else None,
            )
        )
        if gb is not None:
            rows.append(Row(SECTION, case, "peak extra GB (grads incl.)", ours[1], name, gb))
    if ours[1] is not None:
        rows.append(
            Row(SECTION, case, "peak extra GB (grads incl.)", ours[1], "", None, "<= 2 GB", ours[1] <= 2.0)
        )
    if "PyTorch" not in results and "PyTorch" in errors:
        rows.append(Row(SECTION, case, f"time ms (PyTorch failed: {errors['PyTorch'][:60]})", ours[0]))
    del hidden, weight, targets, grads
    _free()
    return rows


def _accuracy_rows(kernels, T, H, V, dtype, device) -> list[Row]:
    """Relative L2 error vs float64 of ours and of the plain path in the same dtype (rule: <= 2x)."""
    hidden, weight, targets, grads = _inputs(T, H, V, dtype, device)
    kw = dict(temperature=TEMPERATURE)
    ours = _step(kernels.logprob_entropy, hidden, weight, targets, grads, **kw)
    plain = _step(kernels.logprob_entropy_ref, hidden, weight, targets, grads, **kw)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    exact = _step(kernels.logprob_entropy_ref, h64, w64, targets, grads, **kw)
    case = f"T={T} H={H} V={V} {str(dtype).replace('torch.', '')} temp {TEMPERATURE}"
    rows = []
    for name, o, p, e in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), ours, plain, exact):
        err, ref_err = rel_err(o, e), rel_err(p, e)
        rows.append(
            Row(
                SECTION,
                case,
                f"{name} rel err vs fp64",
                err,
                "PyTorch same dtype",
                ref_err,
                "<= 2x peer + 1e-6",
                err <= 2 * ref_err + 1e-6,
            )
        )
    del hidden, weight, ours, plain, exact, h64, w64
    _free()
    return rows


def rows(smoke: bool) -> list[Row]:
    kernels = _kernels()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    if smoke:
        return _accuracy_rows(kernels, 37, 19, 1000, torch.bfloat16, device) + _speed_rows(
            kernels, 64, 32, 500, torch.bfloat16, device
        )
    out = _accuracy_rows(kernels, 2048, 1024, 32001, torch.bfloat16, device)
    out += _accuracy_rows(kernels, 1031, 512, 32001, torch.float32, device)
    out += _speed_rows(kernels, 16384, 3584, 152064, torch.bfloat16, device)
    return out
