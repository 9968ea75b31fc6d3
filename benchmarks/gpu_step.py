"""GPU report section: a real-size ARPO training step, its update layouts, and decode against the
weight-read floor.

    python benchmarks/gpu_report.py --only gpu_step           # on a CUDA machine
    python benchmarks/gpu_step.py --smoke                     # any machine: tiny sizes, the same code

The model has Qwen2.5-1.5B's shape (random bf16 weights; 151,936 output rows) and the demo's
tokenizer, whose few hundred ids are all the engine samples (``Engine.vocab_limit``): a random model
then ends a response at EOS after a few hundred tokens on average and writes the tool tags by
chance, so the tool-call count of a row says what the python tool actually ran. Prompts are the
demo's problems padded to about 1.5k tokens; 8 prompts x 16 trajectories (M/N/Z 16/8/2), responses
up to 2k tokens, three training steps through the trainer's own ``setup`` and ``train_step``.

Rows: rollout and update tokens/s of the last step, the update's model FLOPs utilisation (6 N per
trained token, 2 N per token of the old-log-prob pass when it runs; N without the embedding), the
first step's extra update seconds (compilation), graphs compiled in steps 2-3 (target 0), peak
memory; then, on the trajectories of the last step, the packed update against the per-trajectory
one and ``--old-logprobs rollout`` against ``recompute``; then decode at B = 1 and 8 against the
time to read every weight once at the bandwidth measured here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import release, sync, timed  # noqa: E402 - the benchmarks' timing, beside this file
from report import Row  # noqa: E402 - the report's row type, beside this file

SECTION = "step"
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16; the MFU row names the card it ran on
PROMPT_TOKENS, RESPONSE_TOKENS, PROMPTS, TRAJECTORIES = 1536, 2048, 8, 16


def qwen25_15b(device: str, smoke: bool):
    """Qwen2.5-1.5B's shape (published config values), random weights, bf16 on CUDA."""
    from arpo_fast.engine.random_model import random_causal_lm

    size = (
        dict(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
        if smoke
        else dict(vocab=151936, hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960)
    )
    return random_causal_lm(
        "qwen2",
        **size,
        device=device,
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )


def _data_file(folder: Path, tokenizer, prompt_tokens: int, count: int) -> Path:
    """``count`` demo problems, each padded with a preamble to about ``prompt_tokens`` tokens."""
    from arpo_fast.train.demo import demo_splits

    filler = "Think step by step, and check each digit of the product before you answer. "
    per = max(1, len(tokenizer.encode(filler)))
    rows = []
    for a, b in demo_splits(0)["train"][:count]:
        question = f"what is {a} * {b}?"
        pad = filler * max(0, (prompt_tokens - len(tokenizer.encode(question))) // per)
        rows.append({"prompt": pad + question, "ground_truth": str(a * b)})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - emb.numel()


def _steps(run, loop, count: int) -> tuple[list[dict], list[int], list]:
    """``count`` training steps; each one's row, the graphs compiled during it, and the update's
    inputs of the last one (captured as ``loop.update`` is called)."""
    captured: list = []
    real_update = loop.update

    def spy(model, optimizer, data, cfg, **kw):
        captured[:] = [model, optimizer, data, cfg, kw]
        return real_update(model, optimizer, data, cfg, **kw)

    loop.update = spy
    rows, compiled = [], []
    try:
        for step in range(count):
            before = _compiled_graphs()
            rows.append(loop.train_step(run, step))
            sync()
            compiled.append(_compiled_graphs() - before)
    finally:
        loop.update = real_update
    return rows, compiled, captured


def _timed_update(captured, **changes) -> tuple[float, dict]:
    """Seconds of one more update on the captured inputs with ``changes`` to its settings."""
    from arpo_fast.train.update import update

    model, optimizer, data, cfg, kw = captured
    cfg = dataclasses.replace(cfg, **changes)
    out, seconds = timed(lambda: update(model, optimizer, data, cfg, **kw))
    return seconds, out


def step_rows(smoke: bool, device: str) -> list[Row]:
    from arpo_fast.train import loop
    from arpo_fast.train.config import TrainConfig
    from arpo_fast.train.demo import demo_tokenizer

    tok = demo_tokenizer()
    model = qwen25_15b(device, smoke).eval()
    n_params = _non_embedding_params(model)
    prompts, trajs, plen, rlen = (
        (2, 4, 64, 16) if smoke else (PROMPTS, TRAJECTORIES, PROMPT_TOKENS, RESPONSE_TOKENS)
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        data = _data_file(Path(folder), tok, plen, prompts)
        cfg = TrainConfig.from_flat(
            out=str(Path(folder) / "run"),
            data=str(data),
            eval_data="none",
            device=device,
            prompts_per_step=prompts,
            rollouts=trajs,
            initial=trajs // 2,
            max_response_tokens=rlen,
            tools="python",
            demo_warm_start=0,
            save_every=0,
        )
        run = loop.setup(cfg, model, tok)
        history, compiled, captured = _steps(run, loop, 3)
        rows = _step_table(history, compiled, n_params, device, smoke, prompts, trajs)
        rows += _layout_rows(captured, smoke)
    del run, model
    release()
    return rows


def _step_table(history, compiled, n_params, device, smoke, prompts, trajs) -> list[Row]:
    first, last = history[0], history[-1]
    shape = "tiny (smoke)" if smoke else "Qwen2.5-1.5B shape"
    case = f"{shape}, {prompts} prompts x {trajs} traj, ~{64 if smoke else PROMPT_TOKENS}-token prompts"
    generated = last["response_tokens"] - last["shared_tokens"]
    trained = last.get("forward_tokens", last["response_tokens"])
    flops = 6 * n_params * trained
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    out = [
        Row(SECTION, case, "rollout tokens/s (generated)", generated / last["rollout_s"]),
        Row(SECTION, case, "update tokens/s (forward)", trained / last["update_s"]),
        Row(SECTION, case, "update model FLOPs utilisation", flops / last["update_s"] / PEAK_BF16_FLOPS),
        Row(SECTION, case, "first step's extra update s (compile)", first["update_s"] - last["update_s"]),
        Row(
            SECTION,
            case,
            "graphs compiled in steps 2-3",
            float(sum(compiled[1:])),
            target="0",
            ok=None if smoke else sum(compiled[1:]) == 0,
        ),
        Row(SECTION, case, "peak memory GiB", peak),
        Row(SECTION, case, "tool calls (last step)", float(last["tool_calls"])),
        Row(SECTION, case, "mean response tokens", last["response_tokens"] / max(last["trajectories"], 1)),
    ]
    return out


def _layout_rows(captured, smoke: bool) -> list[Row]:
    """The packed update against the per-trajectory one, and the sampler's log-probs as the old
    policy against the recomputed ones, each on the last step's trajectories."""
    cfg = captured[3]
    case = "last step's trajectories"
    packed_s, packed = _timed_update(captured, packed_update=True)
    padded_s, padded = _timed_update(captured, packed_update=False)
    rows = [
        Row(
            SECTION,
            case,
            "packed update s",
            packed_s,
            peer="per-trajectory update",
            peer_value=padded_s,
            target="<= 0.7x",
            ok=None if smoke else packed_s <= 0.7 * padded_s,
        ),
        Row(SECTION, case, "packed forward tokens", packed.get("forward_tokens", float("nan"))),
        Row(SECTION, case, "per-trajectory forward tokens", padded.get("forward_tokens", float("nan"))),
    ]
    if any(f.name == "old_logprobs" for f in dataclasses.fields(cfg)):
        rollout_s, _ = _timed_update(captured, old_logprobs="rollout")
        recompute_s, _ = _timed_update(captured, old_logprobs="recompute")
        rows.append(
            Row(
                SECTION,
                case,
                "update s, --old-logprobs rollout",
                rollout_s,
                peer="--old-logprobs recompute",
                peer_value=recompute_s,
            )
        )
    return rows


def _bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), measured here."""
    n = (256 << 20) if device == "cuda" else (16 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _, seconds = timed(lambda: [dst.copy_(src) for _ in range(10)])
    return 2 * n * 10 / seconds


def decode_rows(smoke: bool, device: str) -> list[Row]:
    """Seconds per decode step at B = 1 and 8 (CUDA graphs where the device has them) against the
    weight-read floor: every layer's weights and the LM head read once at the measured bandwidth."""
    from arpo_fast.engine import Engine, SamplingParams

    model = qwen25_15b(device, smoke).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = weight_bytes / _bandwidth(device)
    new = 16 if smoke else 256
    label = f"{'tiny' if smoke else '1.5B shape'} ({weight_bytes / 2**30:.3g} GiB of weights)"
    rows = []
    for batch in (1, 8):
        engine = Engine(model, max_seq_len=128 + new + 16) if device == "cuda" else Engine(model)
        prompts = [[3 + (7 * i + j) % 900 for j in range(128)] for i in range(batch)]
        params = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
        engine.generate([p[:8] for p in prompts], SamplingParams(temperature=0.0, max_new_tokens=2))
        per_step = timed(lambda e=engine: e.generate(prompts, params))[1] / new
        rows.append(
            Row(
                SECTION,
                f"decode B={batch}, {label}",
                "s per step",
                per_step,
                peer="weight-read floor",
                peer_value=floor,
                target="<= 1.5x floor" if batch == 1 else "",
                ok=(per_step <= 1.5 * floor) if batch == 1 and not smoke else None,
            )
        )
        del engine
        release()
    return rows


def rows(smoke: bool) -> list[Row]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return step_rows(smoke, device) + decode_rows(smoke, device)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args()
    for row in rows(args.smoke):
        print(" | ".join(row.cells()))
