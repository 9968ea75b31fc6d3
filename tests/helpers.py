"""Helpers shared by the test files: the tolerance rule and the sampler's float64 oracle, random
logits, tiny random models with their Hugging Face peers, a python-tool double, and small trainer
configs.

What a benchmark also needs (relative errors, the tool double) lives in ``benchmarks/``, which runs
as scripts and cannot import ``tests/``; it is imported from there.
"""

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from accuracy import max_rel_err, rel_err  # noqa: E402,F401
from calculator import Calculator  # noqa: E402,F401

from arpo_fast.engine.random_model import random_causal_lm  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Tolerances
# ------------------------------------------------------------------------------------------------


def assert_rule(ours, ref, exact, floor: float, names=None):
    """The tolerance rule (DESIGN.md): the error of ``ours`` against the float64 ``exact`` is at most
    2x the error of the PyTorch reference ``ref`` in the same dtype, plus ``floor`` (relative: where
    both errors are a few ulps, their ratio is noise). Each argument is a tensor, or a sequence of
    tensors checked pairwise and labelled by ``names``."""
    if isinstance(ours, torch.Tensor):
        ours, ref, exact = (ours,), (ref,), (exact,)
    names = names or [""] * len(ours)
    for name, o, r, e in zip(names, ours, ref, exact):
        err, ref_err = rel_err(o, e), rel_err(r, e)
        label = f"{name}: " if name else ""
        assert err <= 2 * ref_err + floor, f"{label}error {err:.3g} vs reference's {ref_err:.3g}"


# The sampler's log-prob and entropy are checked within RTOL * |x64| + ATOL of a float64 computation,
# for every input dtype (bf16/fp16 inputs are upcast exactly, so the fp32 bound applies to them too).
# ATOL is for values near zero (a near-deterministic row has log-prob ~ -1e-9, where a relative bound
# on an fp32 result means nothing): the log-sum-exp of a row sums its exponentials near 1 in fp32, and
# that sum carries a few ulps of 1 (2^-23 = 1.2e-7 each) of rounding, which the log passes on as an
# absolute error. 1e-6 is eight such ulps; the reference meets the same bound (its worst seen on a
# row of 272 entries at temperature 0.3 was 2.4e-7 at a log-prob of -3e-4).
RTOL, ATOL = 1e-4, 1e-6


def _row_temps(temperature, B):
    t = temperature if isinstance(temperature, torch.Tensor) else torch.full((B,), float(temperature))
    t = t.double()
    return torch.where(t > 0, t, torch.ones_like(t))


def kept(logits, temperature, top_k=None, top_p=None):
    """Kept-entry mask [B, V] of top-k then top-p, computed independently in float64."""
    x = logits.double()
    B, V = x.shape
    keep = torch.ones_like(x, dtype=torch.bool)
    order = torch.sort(x, dim=1, descending=True).values
    if top_k is not None and 0 < top_k < V:
        keep &= x >= order[:, top_k - 1 : top_k]
    if top_p is not None and top_p < 1:
        t = _row_temps(temperature, B)[:, None]
        z = torch.where(keep, (x - order[:, :1]) / t, float("-inf"))
        p = torch.softmax(z, dim=1)
        for b in range(B):
            ps, idx = torch.sort(p[b], descending=True)
            before = torch.cumsum(ps, 0) - ps
            n = int((before < top_p).sum())
            thr = x[b, idx[n - 1]]
            keep[b] &= x[b] >= thr
    return keep


def _oracle(logits, temperature, tokens, keep=None):
    """Float64 log-prob of ``tokens`` [B] and entropy [B] of the (truncated) tempered rows."""
    x = logits.double()
    if keep is not None:
        x = torch.where(keep, x, float("-inf"))
    t = _row_temps(temperature, x.shape[0])[:, None]
    z = (x - x.max(dim=1, keepdim=True).values) / t
    logp = torch.log_softmax(z, dim=1)
    ent = -torch.where(z > float("-inf"), logp.exp() * logp, 0.0).sum(1)
    return logp.gather(1, tokens.clamp(min=0)[:, None])[:, 0], ent


def assert_close64(out, logits, temperature, keep=None):
    """A ``SampleOutput``'s log-probs and entropies within RTOL/ATOL of the float64 oracle."""
    logp64, ent64 = _oracle(logits, temperature, out.tokens, keep)
    for name, got, want in (("logprob", out.logprobs, logp64), ("entropy", out.entropy, ent64)):
        err = (got.double() - want).abs()
        bound = RTOL * want.abs() + ATOL
        assert bool((err <= bound).all()), f"{name}: max err {err.max():.3g}, values {want.tolist()}"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def random_logits(B, V, dtype=torch.float32, scale=3.0, masked_row=None):
    """[B, V] logits of standard deviation ``scale``; row ``masked_row % B`` (if given) has every
    fourth entry -inf."""
    x = torch.randn(B, V) * scale
    if masked_row is not None:
        x[masked_row % B, ::4] = float("-inf")
    return x.to(dtype)


def sampler_batch(B, V, dtype, device="cuda"):
    """Sampler inputs at full size: logits [B, V] of std 4 with every third entry of every seventh
    row -inf, temperatures in [0.05, 2.05) with every fifth row greedy, seeds and positions [B]."""
    logits = (torch.randn(B, V, device=device) * 4).to(dtype)
    logits[::7, ::3] = float("-inf")
    temps = torch.rand(B, device=device) * 2 + 0.05
    temps[::5] = 0.0
    seeds, pos = torch.arange(B, device=device) * 13, torch.arange(B, device=device)
    return logits, temps, seeds, pos


# ------------------------------------------------------------------------------------------------
# Tiny models (fp32, CPU) and their Hugging Face peers
# ------------------------------------------------------------------------------------------------

ARCHS = ["llama", "qwen2", "qwen3"]
VOCAB = 300

# What sets each family apart. The initializer range is wider than the default so that logits are
# spread out and greedy decoding has no near-ties that float rounding could flip.
_ARCH_CONFIG = {
    "llama": {
        "tie_word_embeddings": False,  # Llama-3 rope scaling, untied head, attention bias off
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
    },
    "qwen2": {"tie_word_embeddings": True},  # qkv bias, tied embeddings
    "qwen3": {"head_dim": 32, "tie_word_embeddings": False},  # q/k norms, head_dim != hidden / heads
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random Llama / Qwen2 / Qwen3 of hidden 64, 2 layers, vocab ``VOCAB``; ``overrides`` are
    config fields."""
    if arch not in _ARCH_CONFIG:
        raise ValueError(arch)
    config = {
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **_ARCH_CONFIG[arch],
        **overrides,
    }
    return random_causal_lm(
        arch, vocab=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=seed, **config
    )


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 logits of the plain HF forward."""
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    dev = model.device
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], device=dev),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


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


def tiny_lora_model(arch: str, rank: int = 4, alpha: float = 8.0, seed: int = 0, dtype=None, **settings):
    """``tiny_model(arch)`` (cast to ``dtype`` if given) with LoRA adapters (``arpo_fast.train.lora``)
    whose B is drawn at random instead of zero, so that the adapters change the model's output."""
    from arpo_fast.train.lora import LoraSettings, adapter_parameters, add_lora

    model = tiny_model(arch, seed=seed)
    if dtype is not None:
        model.to(dtype)
    add_lora(model, LoraSettings(rank, alpha, **settings), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in adapter_parameters(model):
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


TINY_RUN = [  # a run of seconds: no warm start, no tools, two-trajectory trees of short responses
    "--prompts-per-step", "1", "--rollouts", "2", "--initial", "1", "--max-response-tokens", "8",
    "--demo-warm-start", "0", "--tools", "", "--eval-data", "none",
]  # fmt: skip


SMALL_RUN = dict(  # a CPU run of seconds: no warm start, no tools, no held-out evaluation
    steps=2,
    prompts_per_step=2,
    rollouts=4,
    initial=2,
    max_response_tokens=16,
    demo_warm_start=0,
    tools="",
    eval_data="none",
)


def small_config(out, **settings):
    """A ``TrainConfig`` of the demo run in folder ``out``: ``SMALL_RUN`` with ``settings``
    (flag-level names, ``TrainConfig.from_flat``'s) over it."""
    from arpo_fast.train.config import TrainConfig

    return TrainConfig.from_flat(**(SMALL_RUN | {"out": str(out)} | settings))


def run_trainer(*args, env=None, timeout=300):
    """``python -m arpo_fast.train args...`` from the repository root (``env``: added to this
    process's environment); the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    environ = dict(os.environ, TRITON_INTERPRET="0", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "arpo_fast.train", *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
    )
