"""GPU report section: the tree-packed update against the per-trajectory one, on CUDA.

A random model with Qwen2.5-0.5B's shapes in bf16 and one mini-batch of the synthetic ARPO step of
``bench_update.py`` (2 prompts of 1,536 tokens x 16 trajectories, responses of 1-4k tokens, forks
after tool results), with activation checkpointing (the CUDA default). Rows: update wall time
(median of 3 after a warm-up that also compiles flex_attention), packed (flex_attention) against
per trajectory (sdpa, right-padded), target <= 0.7x; tokens through the model; peak memory
(``max_memory_allocated`` over what was allocated before the update) with checkpointing on and
off, and at larger ``--micro-batch-tokens``; the two losses' agreement. The optimizer is SGD at
lr 0, so every run sees the same weights.
"""

from __future__ import annotations

import gc
import statistics

import torch
from harness import timed
from report import Row

SECTION = "update"


def _model(smoke: bool, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from arpo_fast.train.demo import move_model

    shape = (
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        if smoke
        else dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
        )
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=8192, tie_word_embeddings=True, **shape))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return move_model(model, device, dtype).eval(), shape["vocab_size"]


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _update(model, work, device, **settings) -> tuple[float, float, dict]:
    """One update: (seconds, peak extra GB, metrics)."""
    from arpo_fast.rollout.responses import assemble_tree
    from arpo_fast.train.optim import MasterWeights
    from arpo_fast.train.update import UpdateConfig, UpdateData, update

    trajs, node_tokens, adv = work
    record = assemble_tree(trajs, node_tokens)
    optimizer = MasterWeights(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.0))
    _free(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    cfg = UpdateConfig(mini_batch_prompts=16, **settings)
    metrics, seconds = timed(lambda: update(model, optimizer, UpdateData(record, adv), cfg))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    optimizer.remove_hooks()
    return seconds, peak, metrics


def _timed_updates(model, work, device, case: str, repeats: int) -> tuple[dict, dict, list[Row]]:
    """(seconds of each timed update by layout, the last update's metrics by layout, the first
    (compiling) update's rows); True: packed, False: per trajectory."""
    times, runs, first = {True: [], False: []}, {}, []
    for r in range(repeats + 1):  # the first round warms up (and compiles flex_attention)
        for packed in (True, False):
            seconds, _, runs[packed] = _update(model, work, device, packed_update=packed)
            if r:
                times[packed].append(seconds)
            else:  # printed at once: a run cut short still shows how long the first update took
                first.append(
                    Row(
                        SECTION,
                        case,
                        f"first update s ({'packed' if packed else 'per trajectory'}, compiles)",
                        seconds,
                    )
                )
    return times, runs, first


def _memory_rows(model, work, device, case: str) -> list[Row]:
    """Peak memory of the update with activation checkpointing on and off, and at larger
    micro-batches."""
    out = []
    _, on, _ = _update(model, work, device, gradient_checkpointing="true")
    _, off, _ = _update(model, work, device, gradient_checkpointing="false")
    out.append(
        Row(
            SECTION,
            case + ", 16384-token micro-batches",
            "peak memory GB (checkpointing on)",
            on,
            "checkpointing off",
            off,
        )
    )
    for budget in (32768, 65536):  # memory only: a new row length may compile flex_attention again
        _, peak, m = _update(model, work, device, micro_batch_tokens=budget)
        larger = case + f", {budget}-token micro-batches, checkpointing on"
        out.append(Row(SECTION, larger, "peak memory GB", peak))
        out.append(Row(SECTION, larger, "forward tokens", m["forward_tokens"]))
    return out


def rows(smoke: bool) -> list[Row]:
    from bench_update import arpo_workload

    from arpo_fast.train.update import UpdateConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab = _model(smoke, device)
    size = dict(prompt_len=24, response=(16, 64), result=(2, 8)) if smoke else {}
    trajs, node_tokens, _ = arpo_workload(0, 2, vocab=vocab, **size)
    g = torch.Generator().manual_seed(0)
    work = (trajs, node_tokens, [torch.randn(len(t.response_ids), generator=g) for t in trajs])
    repeats = 1 if smoke else 3
    attention = {p: UpdateConfig(packed_update=p).resolved(device)[0] for p in (True, False)}
    case = (
        f"{'tiny' if smoke else 'Qwen2.5-0.5B shapes'}, {attention[True]} vs {attention[False]}, "
        f"2 prompts x 16 trajectories"
    )
    times, runs, first = _timed_updates(model, work, device, case, repeats)
    packed, plain = (statistics.median(times[p]) for p in (True, False))
    out = first + [
        Row(
            SECTION,
            case,
            "update s",
            packed,
            "per trajectory",
            plain,
            target="<= 0.7x of per trajectory",
            ok=packed <= 0.7 * plain,
        ),
        Row(
            SECTION,
            case,
            "forward tokens",
            runs[True]["forward_tokens"],
            "per trajectory",
            runs[False]["forward_tokens"],
        ),
        Row(
            SECTION,
            case,
            "loss difference from per trajectory",
            abs(runs[True]["loss"] - runs[False]["loss"]),
            target="<= 1e-2 (bf16)",
            ok=abs(runs[True]["loss"] - runs[False]["loss"]) <= 1e-2,
        ),
    ]
    if device.type == "cuda":
        out += _memory_rows(model, work, device, case)
    return out
