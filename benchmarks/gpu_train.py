"""GPU report section: whole ARPO training steps (rollout on the engine, rewards, update) on CUDA.

The demo pipeline (``arpo_fast/train/demo.py``) with a wider model: a short supervised warm start so the
model calls the python tool, then three training steps in bf16 with the reference's tree settings.
It checks that the trainer runs on the GPU (CUDA graphs in the rollout, the Triton log-prob kernel
in the update) and reports each stage's rate in the last step (the first ones compile
flex_attention), and the first step's update time; no peer trainer runs here.
"""

from __future__ import annotations

import math
import tempfile

import torch
from report import Row

SECTION = "train"


def rows(smoke: bool) -> list[Row]:
    from arpo_fast.train.config import TrainConfig
    from arpo_fast.train.demo import demo_model, demo_tokenizer, move_model, warm_start
    from arpo_fast.train.loop import train

    cuda = torch.cuda.is_available()
    size = (
        dict(steps=1, rollouts=2, initial=1, max_response_tokens=8)
        if smoke
        else dict(steps=3, rollouts=16, initial=8, max_response_tokens=256, prompts_per_step=8)
    )
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_flat(
            out=out, device="cuda" if cuda else "cpu", demo_warm_start=0, tools="python", **size
        )
        tok = demo_tokenizer()
        model = demo_model(tok, seed=0, layers=2 if smoke else 8, hidden=64 if smoke else 512)
        model = model.to(cfg.device)
        if not smoke:
            warm_start(model, tok, steps=200)  # in fp32
        model = move_model(model, cfg.device, torch.bfloat16 if cuda else torch.float32).eval()
        history = train(cfg, model, tok)
    where = f"{'bf16, ' if cuda else ''}{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
    last = history[-1]
    ok = all(math.isfinite(m["loss"]) for m in history)
    case = f"demo step ({where}), {cfg.prompts_per_step} prompts x {cfg.rollout.rollouts} trajectories"
    return [
        Row(
            SECTION,
            case,
            "rollout tokens/s",
            last["response_tokens"] / last["rollout_s"],
            target="runs, loss finite",
            ok=ok,
        ),
        Row(SECTION, case, "update tokens/s", last["tokens"] / last["update_s"]),
        Row(SECTION, case, "first step's update s (compiles flex_attention on CUDA)", history[0]["update_s"]),
        Row(SECTION, case, "tool calls", float(last["tool_calls"])),
        Row(SECTION, case, "branch points", float(last["branch_points"])),
    ]
