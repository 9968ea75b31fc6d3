"""A real model's job settings default to the reference's training script; the demo keeps its own,
and --help shows both."""

import subprocess
import sys

from arpo_fast.train import run_config
from arpo_fast.train.cli import parse_config
from arpo_fast.train.config import TrainConfig


def test_a_real_model_gets_the_reference_scripts_job_settings():
    own = TrainConfig(out="x", model="/models/qwen", data="train.parquet")
    assert (own.prompts_per_step, own.rollout.max_response_tokens, own.lr) == (128, 4096, 1e-6)
    # the rest of the 7B reasoning script: tree, sampling, clipping, mini-batches, KL and entropy
    assert (own.rollout.rollouts, own.rollout.initial, own.rollout.branches) == (16, 8, 2)
    assert (own.rollout.threshold, own.rollout.entropy_weight, own.temperature, own.top_p) == (0.5, 0.2, 1, 1)
    assert (own.update.mini_batch_prompts, own.update.kl_coef, own.update.entropy_coef) == (16, 0, 0)
    assert (own.max_calls, own.weight_decay, own.update.grad_clip) == (3, 0.01, 1.0)


def test_the_demo_keeps_its_own_and_explicit_values_win():
    demo = TrainConfig(out="x")
    assert (demo.prompts_per_step, demo.rollout.max_response_tokens) == (8, 64)
    assert {"prompts_per_step", "max_response_tokens"} <= demo.auto_settings
    given = TrainConfig.from_flat(out="x", model="/m", prompts_per_step=4, max_response_tokens=100)
    assert (given.prompts_per_step, given.rollout.max_response_tokens) == (4, 100)
    assert "prompts_per_step" not in given.auto_settings
    cfg = parse_config(["--model", "/m", "--max-response-tokens", "auto", "--out", "x"])
    assert cfg.rollout.max_response_tokens == 4096
    # another setting of the same group leaves it auto
    cfg = parse_config(["--model", "/m", "--rollouts", "12", "--out", "x"])
    assert (cfg.rollout.rollouts, cfg.rollout.max_response_tokens) == (12, 4096)


def test_config_yaml_records_auto_and_what_it_resolved_to(tmp_path):
    cfg = TrainConfig.from_flat(out=str(tmp_path), model="/m")
    text = run_config.render(cfg)
    assert "\nprompts_per_step: auto  # 128\n" in text and "\nmax_response_tokens: auto  # 4096\n" in text


def test_help_shows_both_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "arpo_fast.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    text = " ".join(out.split())
    assert "the reference's 128, or the demo's 8 with --model demo" in text
    assert "the reference's 4096 tokens, or the demo's 64 with --model demo" in text
