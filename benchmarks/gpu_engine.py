"""GPU report section: the rollout engine and its paged attention.

* decode throughput: a Qwen2.5-0.5B-shaped model (random weights, bf16), 256 sequences x 1024 new
  tokens, greedy, against HF ``generate`` (its default cache) on the same model object and prompts.
  HF runs fewer new tokens (``HF_NEW_TOKENS``) to keep the report short; its per-token cost grows
  with the context, so its tokens/s over a shorter run flatters it, never us.
* paged decode attention at B = 256, context 4096, Qwen2.5-7B heads (28 query, 4 KV, dim 128):
  effective bandwidth (K/V bytes read per second) against the measured copy bandwidth, and the
  gather + SDPA reference in the same run.
* branching: 64 prompts x 16 branches after a 2048-token prefix, fork vs re-prefilling each branch.

``--smoke`` runs every row at toy sizes on any machine (CPU kernels under the Triton interpreter).
"""

from __future__ import annotations

import torch
from accuracy import max_rel_err
from bench_engine import (
    branching,
    engine_generate_tps,
    hf_generate_tps,
    random_prompts,
    tiny_model,
)
from harness import release
from report import Row, bench_us, copy_bandwidth_gbs

from arpo_fast.engine import Engine
from arpo_fast.engine.random_model import random_causal_lm
from arpo_fast.kernels import paged_attention_decode, paged_attention_decode_ref

SECTION = "engine"
HF_NEW_TOKENS = 256


def qwen25_05b(device: str):
    """Qwen2.5-0.5B's shape (config values as published), random weights drawn on ``device``, bf16."""
    return random_causal_lm(
        "qwen2",
        vocab=151936,
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        device=device,
        dtype=torch.bfloat16,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )


def _logit_error(model, device) -> float:
    """Max relative error of the engine's prompt logits against the HF forward (same dtype)."""
    prompts = random_prompts(3, 40, model.config.vocab_size, seed=3)
    prompts[1] = prompts[1][:17]
    engine = Engine(model, num_blocks=64)
    worst = 0.0
    with torch.no_grad():
        for p, ours in zip(prompts, engine.logits([engine.add(p) for p in prompts], all_positions=True)):
            ref = model(torch.tensor([p], device=device)).logits[0].float()
            worst = max(worst, max_rel_err(ours, ref))
    return worst


def decode_rows(smoke: bool, device: str) -> list[Row]:
    model = tiny_model(device=device) if smoke else qwen25_05b(device)
    B, prompt_len, new, hf_new = (4, 16, 8, 8) if smoke else (256, 128, 1024, HF_NEW_TOKENS)
    prompts = random_prompts(B, prompt_len, model.config.vocab_size)
    rows = []
    err = _logit_error(model, device)
    limit = 1e-4 if smoke else 5e-2  # fp32 on the CPU; bf16 on the GPU (different reduction orders)
    rows.append(
        Row(
            SECTION,
            f"prompt logits vs HF forward ({model.dtype})",
            "max rel err",
            err,
            target=f"<= {limit:g}",
            ok=err <= limit,
        )
    )
    configs = [("eager", {"cuda_graphs": False})]
    if device == "cuda":  # the default on CUDA
        configs.append(
            ("CUDA graphs (default)", {"max_graph_batch": B, "max_seq_len": prompt_len + new + 16})
        )
    hf = hf_generate_tps(model, prompts, hf_new)
    for name, kw in configs:
        engine = Engine(model, **kw)
        ours = engine_generate_tps(engine, prompts, new)
        captured = engine.runner.graphs is not None and bool(engine.runner.graphs.graphs)
        judged = not smoke and name != "eager"  # the target is for the default (graphs) path
        label = name if captured or name == "eager" else f"{name} (capture failed: eager)"
        rows.append(
            Row(
                SECTION,
                f"decode {B} seqs x {new} new tokens, {label}",
                "tokens/s",
                ours,
                peer=f"HF generate ({hf_new} new tokens)",
                peer_value=hf,
                target=">= 5x HF" if judged else "",
                ok=ours >= 5 * hf if judged else None,
            )
        )
        del engine
        release()
    del model
    release()
    return rows


def _attention_inputs(B, ctx, H, Hk, D, page, dtype, device):
    blocks = B * ctx // page
    k_cache = torch.randn(blocks, page, Hk, D, device=device).to(dtype)
    v_cache = torch.randn(blocks, page, Hk, D, device=device).to(dtype)
    tables = torch.randperm(blocks, device=device).view(B, ctx // page).to(torch.int32)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(B, H, D, device=device).to(dtype)
    return q, k_cache, v_cache, tables, lens


def attention_rows(smoke: bool, device: str) -> list[Row]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = [(2, 64, 4, 2, 32)] if smoke else [(256, 4096, 28, 4, 128), (8, 4096, 28, 4, 128)]
    hbm = copy_bandwidth_gbs()
    rows = []
    for B, ctx, H, Hk, D in cases:
        args = _attention_inputs(B, ctx, H, Hk, D, 16, dtype, device)
        kv_bytes = 2 * args[1].numel() * args[1].element_size()
        ours = kv_bytes / bench_us(lambda a=args: paged_attention_decode(*a)) / 1e3
        ref = kv_bytes / bench_us(lambda a=args: paged_attention_decode_ref(*a), reps=5) / 1e3
        main = (B, ctx) == (256, 4096)
        rows.append(
            Row(
                SECTION,
                f"paged decode attention B={B} ctx={ctx} heads {H}/{Hk} d={D}",
                "K/V GB/s",
                ours,
                peer="gather + SDPA",
                peer_value=ref,
                target=f">= 60% of copy bw {hbm:.0f}" if main else f"copy bw {hbm:.0f}",
                ok=ours >= 0.6 * hbm if main and not smoke else None,
            )
        )
        del args
        release()
    return rows


def branching_rows(smoke: bool, device: str) -> list[Row]:
    model = tiny_model(device=device) if smoke else qwen25_05b(device)
    P, Z, L, T, chunk = (2, 2, 32, 3, 0) if smoke else (64, 16, 2048, 32, 16)
    branching(model, 2, 2, 16, 2)  # warm-up (compiles the kernels)
    r = branching(model, P, Z, L, T, chunk=chunk)
    del model
    release()
    case = f"branching {P} prompts x {Z} branches after {L} tokens, {T} new"
    fork, re = r["fork"], r["reprefill"]
    return [
        Row(
            SECTION,
            case,
            "prefill tokens (fork)",
            fork["prefill_tokens"],
            peer="re-prefill each branch",
            peer_value=re["prefill_tokens"],
        ),
        Row(
            SECTION,
            case,
            "wall s (fork)",
            fork["seconds"],
            peer="re-prefill each branch",
            peer_value=re["seconds"],
            target="faster than re-prefill",
            ok=None if smoke else fork["seconds"] < re["seconds"],
        ),
    ]


def rows(smoke: bool) -> list[Row]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for part in (attention_rows, decode_rows, branching_rows):
        out.extend(part(smoke, device))
    return out
