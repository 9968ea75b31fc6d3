"""``python -m arpo_fast.train --plan-memory``: the per-GPU plan from a config.json alone, no GPU,
no weights, nothing written."""

import json
import re
import subprocess
import sys

import pytest

from arpo_fast.engine.random_model import random_causal_lm

QWEN3_14B = {  # Qwen3-14B's config.json, the fields the plan reads
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 17408,
    "tie_word_embeddings": False,
}
QWEN25_7B = {  # Qwen2.5-7B's config.json, the fields the plan reads
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "tie_word_embeddings": False,
}


def _plan(*args, cwd=None):
    cmd = [sys.executable, "-m", "arpo_fast.train", "--plan-memory", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def _gib(text: str, row: str, column: int) -> float:
    """The figure of ``row`` in the table (column 0: rollout, 1: update)."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {row}"))
    return float(re.sub(r"[*]", "", line.split("|")[2 + column]))


def test_qwen3_14b_on_eight_80gb_gpus_leaves_20_gib_for_kv_and_activations(tmp_path):
    model = tmp_path / "qwen3-14b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_14B))
    proc = _plan("--model", str(model), "--gpus", "8", "--gpu-memory-gib", "79.6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "14.77 B parameters" in out and "8 GPU(s) of 79.6 GiB" in out
    assert _gib(out, "**KV pool**", 0) >= 20
    assert _gib(out, "activations", 1) + _gib(out, "**free**", 1) >= 20
    assert out.splitlines()[-1].startswith("fits: KV pool")
    assert list(tmp_path.iterdir()) == [model]  # no run folder


def test_a_tiny_saved_model_and_the_demo(tmp_path):
    model = random_causal_lm("qwen2", vocab=97, hidden=64, layers=2, heads=4, kv_heads=2)
    model.save_pretrained(tmp_path / "tiny")
    (tmp_path / "tiny" / "model.safetensors").write_bytes(b"not weights")  # never read
    n = sum(p.numel() for p in model.parameters())
    proc = _plan("--model", str(tmp_path / "tiny"), "--gpu-memory-gib", "16", "--micro-batch-tokens", "4096")
    assert proc.returncode == 0, proc.stderr
    assert f"{n / 1e6:.2f} M parameters" in proc.stdout and "1 GPU(s) of 16 GiB" in proc.stdout
    assert "micro-batches of 4096 tokens" in proc.stdout
    demo = _plan("--gpus", "2", "--gpu-memory-gib", "16", "--offload-optimizer")
    assert demo.returncode == 0, demo.stderr
    assert "2 GPU(s)" in demo.stdout and "optimizer offloaded" in demo.stdout
    assert _gib(demo.stdout, "AdamW state", 0) == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent-model"], "--model /nonexistent-model: cannot read a model shape"),
        (["--gpus", "4", "--hsdp-replicas", "3"], "--hsdp-replicas 3 must divide the number of GPUs (4)"),
        (["--gpu-memory-gib", "0"], "--gpu-memory-gib must be > 0"),
    ],
)
def test_bad_input_is_one_line(args, message):
    proc = _plan(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name,config,params", [("qwen2.5-7b", QWEN25_7B, 7.62), ("qwen3-14b", QWEN3_14B, 14.77)]
)
def test_lora_rank_64_fits_one_80gb_gpu_at_the_reference_settings(tmp_path, name, config, params):
    """The reference's settings are the defaults (128 prompts x 16 trajectories, 16,384-token
    micro-batches); the frozen base is 2 B a parameter, the adapters alone train."""
    model = tmp_path / name
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    args = ("--model", str(model), "--gpu-memory-gib", "79.6", "--lora-rank", "64", "--kl-coef", "0.01")
    proc = _plan(*args)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{params:.2f} B parameters, LoRA rank 64, 1 GPU(s)" in out
    assert _gib(out, "frozen base weights, bf16", 0) == _gib(out, "frozen base weights, bf16", 1)
    assert _gib(out, "frozen base weights, bf16", 1) == pytest.approx(2 * params * 1e9 / 2**30, abs=0.1)
    assert _gib(out, "LoRA adapters, fp32", 1) < 1.5 and _gib(out, "KL reference", 1) == 0
    assert "fp32 master weights" not in out
    assert _gib(out, "**KV pool**", 0) >= 40 and _gib(out, "**free**", 1) >= 20
    assert out.splitlines()[-1].startswith("fits: KV pool")
