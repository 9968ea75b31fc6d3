"""Tests of the blocked log-prob/entropy op against float64 and plain-PyTorch references.

Tolerance rule (DESIGN.md): for every output and gradient, the error of ours against a float64
reference is at most 2x the error of ``logprob_entropy_ref`` run in the same dtype, plus a floor
``FLOOR`` (relative) for fp32, where both errors are a few ulps and their ratio is noise. Errors are
relative L2 norms, ||x - x64|| / ||x64||, which are steadier than a max over a few dozen elements.

On the CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest), so shapes stay
small; the blocked PyTorch path (what CPU tensors use outside the interpreter) is tested too.
"""

import importlib
import math

import pytest
import torch
from helpers import assert_rule
from hypothesis import given, settings
from hypothesis import strategies as st

from arpo_fast.kernels import logprob_entropy, logprob_entropy_ref
from arpo_fast.kernels.logprob_entropy import _logprob_entropy, default_chunk_size

FLOOR = 1e-6
OUTPUTS = ("logprobs", "entropy", "grad_hidden", "grad_weight")
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(T, H, V, dtype, device="cpu", scale=3.0):
    """hidden [T, H], weight [V, H] (logits of std ~scale), targets [T] hitting 0 and V - 1."""
    hidden = torch.randn(T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * (scale / math.sqrt(H))).to(dtype)
    targets = torch.randint(0, V, (T,), device=device)
    targets[0] = 0
    targets[T // 2] = V - 1
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, g_lp, g_ent, **kw):
    """Outputs and both gradients of sum(g_lp * logprobs + g_ent * entropy)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    lp, ent = fn(h, w, targets, **kw)
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _check_against_float64(T, H, V, dtype, temperature, chunk_size, triton_path):
    hidden, weight, targets = _inputs(T, H, V, dtype)
    g_lp, g_ent = torch.randn(T), torch.randn(T)

    def ours(h, w, t, **kw):
        return _logprob_entropy(h, w, t, temperature, chunk_size, -100, triton_path)

    got = _run(ours, hidden, weight, targets, g_lp, g_ent)
    ref = _run(logprob_entropy_ref, hidden, weight, targets, g_lp, g_ent, temperature=temperature)
    exact = _run(
        logprob_entropy_ref, hidden.double(), weight.double(), targets, g_lp, g_ent, temperature=temperature
    )
    assert all(x.dtype == torch.float32 for x in got[:2])
    assert got[2].dtype == dtype and got[3].dtype == dtype
    assert_rule(got, ref, exact, FLOOR, OUTPUTS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "T,H,V,chunk", [(37, 19, 1000, 300), (37, 19, 97, None), (5, 3, 1, None), (64, 32, 256, 100)]
)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_triton_matches_float64(T, H, V, chunk, dtype, temperature):
    _check_against_float64(T, H, V, dtype, temperature, chunk, triton_path=True)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_blocked_torch_path_matches_float64(dtype, temperature):
    _check_against_float64(37, 19, 1000, dtype, temperature, 333, triton_path=False)


def test_fp16_triton_matches_float64():
    _check_against_float64(37, 19, 97, torch.float16, 1.0, 40, triton_path=True)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 9),
    H=st.integers(1, 8),
    V=st.integers(1, 70),
    chunk=st.integers(1, 80),
    temperature=st.floats(0.3, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_blocked_torch_path_any_shape(T, H, V, chunk, temperature, seed):
    """Any small shape and chunking, fp32: close to float64 (loose fixed bounds, fast path)."""
    torch.manual_seed(seed)
    hidden, weight, targets = _inputs(T, H, V, torch.float32)
    g_lp, g_ent = torch.randn(T), torch.randn(T)

    def ours(h, w, t):
        return _logprob_entropy(h, w, t, temperature, chunk, -100, False)

    got = _run(ours, hidden, weight, targets, g_lp, g_ent)
    exact = _run(
        logprob_entropy_ref, hidden.double(), weight.double(), targets, g_lp, g_ent, temperature=temperature
    )
    for a, b in zip(got, exact):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@settings(max_examples=6, deadline=None)
@given(T=st.integers(1, 9), V=st.integers(1, 70), chunk=st.integers(5, 80), seed=st.integers(0, 2**31 - 1))
def test_triton_path_any_shape(T, V, chunk, seed):
    torch.manual_seed(seed)
    hidden, weight, targets = _inputs(T, 5, V, torch.float32)
    g_lp, g_ent = torch.randn(T), torch.randn(T)

    def ours(h, w, t):
        return _logprob_entropy(h, w, t, 1.3, chunk, -100, True)

    got = _run(ours, hidden, weight, targets, g_lp, g_ent)
    exact = _run(logprob_entropy_ref, hidden.double(), weight.double(), targets, g_lp, g_ent, temperature=1.3)
    for a, b in zip(got, exact):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_cpu_tensors_without_interpreter_use_the_blocked_torch_path(monkeypatch):
    mod = importlib.import_module("arpo_fast.kernels.logprob_entropy")
    calls = []
    monkeypatch.setattr(mod, "use_triton", lambda t: calls.append(t.device) or False)
    monkeypatch.setitem(mod._BACKENDS, True, None)  # the Triton path would fail if reached
    hidden, weight, targets = _inputs(7, 6, 40, torch.float32)
    got = _run(logprob_entropy, hidden, weight, targets, torch.randn(7), torch.randn(7), chunk_size=9)
    assert calls == [torch.device("cpu")]
    assert all(torch.isfinite(x).all() for x in got)


@pytest.mark.parametrize("chunk", [3, 7, 64, 99, 100, 500])
def test_result_does_not_depend_on_chunking(chunk):
    """Blocks merge exactly; only fp32 summation order differs (each block is one kernel launch,
    slow under the interpreter, hence a small V)."""
    hidden, weight, targets = _inputs(13, 11, 100, torch.float32)
    g_lp, g_ent = torch.randn(13), torch.randn(13)
    base = _run(logprob_entropy, hidden, weight, targets, g_lp, g_ent, temperature=0.9)
    got = _run(logprob_entropy, hidden, weight, targets, g_lp, g_ent, temperature=0.9, chunk_size=chunk)
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_blocks_never_exceed_chunk(monkeypatch):
    """No [T, V]-sized logits: every block the op materialises is at most chunk_size wide."""
    # The package attribute ``logprob_entropy`` is the function; the module is reached by name.
    mod = importlib.import_module("arpo_fast.kernels.logprob_entropy")

    widths, real = [], mod._logits_block

    def spy(hidden, weight, v0, v1, buf):
        widths.append(v1 - v0)
        assert buf.numel() <= hidden.shape[0] * 64
        return real(hidden, weight, v0, v1, buf)

    monkeypatch.setattr(mod, "_logits_block", spy)
    hidden, weight, targets = _inputs(9, 8, 200, torch.float32)
    _run(logprob_entropy, hidden, weight, targets, torch.randn(9), torch.randn(9), chunk_size=64)
    assert widths and max(widths) <= 64
    assert sum(widths) == 2 * 200  # forward once, backward recomputes once


def test_ignore_index_rows_give_zero_and_no_gradient():
    hidden, weight, targets = _inputs(11, 8, 50, torch.float32)
    targets[3] = targets[7] = -100
    g_lp, g_ent = torch.randn(11), torch.randn(11)
    lp, ent, gh, gw = _run(logprob_entropy, hidden, weight, targets, g_lp, g_ent, chunk_size=16)
    assert lp[3] == 0 and lp[7] == 0 and ent[3] == 0 and ent[7] == 0
    assert gh[3].abs().max() == 0 and gh[7].abs().max() == 0
    keep = targets != -100
    sub = _run(logprob_entropy, hidden[keep], weight, targets[keep], g_lp[keep], g_ent[keep])
    torch.testing.assert_close(lp[keep], sub[0])
    torch.testing.assert_close(ent[keep], sub[1])
    torch.testing.assert_close(gh[keep], sub[2])
    torch.testing.assert_close(gw, sub[3])
    ref = _run(logprob_entropy_ref, hidden, weight, targets, g_lp, g_ent)
    for a, b in zip((lp, ent, gh, gw), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_leading_dims_and_one_output_used():
    hidden, weight, targets = _inputs(12, 8, 40, torch.float32)
    h3 = hidden.view(3, 4, 8).requires_grad_()
    lp, ent = logprob_entropy(h3, weight, targets.view(3, 4), temperature=1.3)
    assert lp.shape == ent.shape == (3, 4)
    lp.sum().backward()  # the entropy's gradient never arrives
    h_ref = hidden.clone().requires_grad_()
    logprob_entropy_ref(h_ref, weight, targets, temperature=1.3)[0].sum().backward()
    torch.testing.assert_close(h3.grad.view(12, 8), h_ref.grad, rtol=1e-4, atol=1e-6)


def test_gradient_of_weight_alone():
    hidden, weight, targets = _inputs(10, 6, 33, torch.float32)
    w = weight.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    g = torch.randn(10)
    (logprob_entropy(hidden, w, targets, chunk_size=8)[1] * g).sum().backward()
    (logprob_entropy_ref(hidden, w_ref, targets)[1] * g).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)


def test_large_logits_stay_finite():
    hidden, weight, targets = _inputs(16, 8, 300, torch.float32, scale=200.0)
    lp, ent, gh, gw = _run(
        logprob_entropy, hidden, weight, targets, torch.randn(16), torch.randn(16), chunk_size=50
    )
    for x in (lp, ent, gh, gw):
        assert torch.isfinite(x).all()
    assert (lp <= 0).all() and (ent >= -1e-5).all()
    exact = logprob_entropy_ref(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(lp.double(), exact[0], rtol=1e-5, atol=1e-3)


def test_empty_token_batch():
    hidden, weight, _ = _inputs(4, 8, 30, torch.float32)
    h = hidden[:0].clone().requires_grad_()
    lp, ent = logprob_entropy(h, weight, torch.zeros(0, dtype=torch.int64))
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 8)


def test_default_chunk_size():
    assert default_chunk_size(16384, 152064, 2) == 8192  # Qwen2.5-7B head, bf16: 256 MiB blocks
    assert default_chunk_size(37, 1000, 4) == 1000
    assert default_chunk_size(10**7, 152064, 2) == 256  # floor: never narrower than 256 columns
    assert default_chunk_size(10**7, 7, 2) == 7


@pytest.mark.parametrize("bad", [-1, 1000, 10**6])
def test_out_of_range_target_is_a_clear_error(bad):
    hidden, weight, targets = _inputs(5, 4, 1000, torch.float32)
    targets[2] = bad
    message = rf"target {bad} at flat position 2 is outside the vocabulary \[0, 1000\)"
    with pytest.raises(ValueError, match=message):
        logprob_entropy(hidden, weight, targets)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        logprob_entropy_ref(hidden, weight, targets)


def test_unchecked_out_of_range_target_gives_nan_not_a_wrong_number():
    hidden, weight, targets = _inputs(5, 4, 100, torch.float32)
    targets[2] = 100
    lp, ent = logprob_entropy(hidden, weight, targets, check_targets=False)
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3, 4]]).all() and torch.isfinite(ent).all()


@pytest.mark.parametrize(
    "case,exc,pattern",
    [
        ("hidden_size", ValueError, "hidden size mismatch"),
        ("targets_shape", ValueError, "targets must have shape"),
        ("dtype_mix", TypeError, "share one dtype"),
        ("float64", TypeError, "share one dtype"),
        ("float_targets", TypeError, "targets must be int64"),
        ("temperature", ValueError, "temperature must be > 0"),
        ("chunk", ValueError, "chunk_size must be >= 1"),
        ("weight_rank", ValueError, r"weight \[V, H\]"),
    ],
)
def test_bad_inputs_are_clear_errors(case, exc, pattern):
    hidden, weight, targets = _inputs(6, 4, 20, torch.float32)
    kw = {}
    if case == "hidden_size":
        weight = weight[:, :3]
    elif case == "targets_shape":
        targets = targets[:5]
    elif case == "dtype_mix":
        weight = weight.to(torch.bfloat16)
    elif case == "float64":
        hidden, weight = hidden.double(), weight.double()
    elif case == "float_targets":
        targets = targets.float()
    elif case == "temperature":
        kw["temperature"] = 0.0
    elif case == "chunk":
        kw["chunk_size"] = 0
    elif case == "weight_rank":
        weight = weight[None]
    with pytest.raises(exc, match=pattern):
        logprob_entropy(hidden, weight, targets, **kw)


# ---- the kernels compile for a real GPU (no device needed) ----

_COMPILE_SCRIPT = r"""
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod = importlib.import_module("arpo_fast.kernels.logprob_entropy")
rows = "stride_row n_cols col0".split()
for ptr in ("*bf16", "*fp16", "*fp32"):
    for fn, stats, block, warps in (
            (mod._logprob_entropy_fwd_kernel, "m_ptr s_ptr w_ptr zt_ptr", 4096, 8),
            (mod._logprob_entropy_bwd_kernel, "logz_ptr ent_ptr glp_ptr gent_ptr", 2048, 4)):
        sig = {"logits_ptr": ptr, **{k: "i32" for k in rows}, "tgt_ptr": "*i64",
               **{k: "*fp32" for k in stats.split()}, "inv_temp": "fp32", "BLOCK": "constexpr"}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": block}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """The interpreter accepts code that the compiler rejects (e.g. a loop-carried value changing
    type); compile both kernels to a Hopper cubin so CPU-only CI catches that."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    err = proc.stderr[-3000:]
    if proc.returncode and ("ptxas" in err or "ImportError" in err or "cannot import" in err):
        pytest.skip(f"this Triton cannot compile for CUDA here: {err.splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, err


# ---- GPU: real sizes (skipped without CUDA) ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_matches_float64_at_real_size(dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    T, H, V = 1531, 1024, 32001
    hidden, weight, targets = _inputs(T, H, V, dtype, device="cuda")
    targets[-1] = V - 1
    g_lp, g_ent = torch.randn(T, device="cuda"), torch.randn(T, device="cuda")
    kw = dict(temperature=0.7)
    got = _run(logprob_entropy, hidden, weight, targets, g_lp, g_ent, chunk_size=5000, **kw)
    ref = _run(logprob_entropy_ref, hidden, weight, targets, g_lp, g_ent, **kw)
    exact = _run(logprob_entropy_ref, hidden.double(), weight.double(), targets, g_lp, g_ent, **kw)
    assert_rule(got, ref, exact, FLOOR, OUTPUTS)


@pytest.mark.gpu
def test_gpu_peak_memory_below_plain_path():
    T, H, V = 4096, 1024, 65536
    hidden, weight, targets = _inputs(T, H, V, torch.bfloat16, device="cuda")
    g = torch.randn(T, device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(fn, hidden, weight, targets, g, g)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours, plain = peak(logprob_entropy), peak(logprob_entropy_ref)
    logits_bytes = T * V * 2
    assert ours < plain / 3 and ours < logits_bytes + 2 * weight.numel() * 2
