"""What a run leaves a user to open: the plot (drawn with or without held-out prompts), the
checkpoint's model and tokenizer (each loadable with its Auto class), W&B and TensorBoard logs with
the learning rate and the config; and what picks rewards (--reward-key) and held-out prompts
(--eval-limit)."""

import json
import shutil

import pytest
from helpers import TINY_RUN, run_trainer, small_config

from arpo_fast.rollout import RewardResult, register_reward
from arpo_fast.train import report
from arpo_fast.train.build import reward_config
from arpo_fast.train.checkpoint import find_checkpoint
from arpo_fast.train.cli import parse_config
from arpo_fast.train.data import prepare
from arpo_fast.train.loop import train


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _tiny(tmp_path, **kw):  # one step of one two-trajectory tree of short responses
    settings = {"steps": 1, "prompts_per_step": 1, "rollouts": 2, "initial": 1, "max_response_tokens": 8}
    return small_config(**({"out": tmp_path / "run"} | settings | kw))


def test_a_run_without_held_out_prompts_draws_its_curves_and_logs_the_learning_rate(tmp_path):
    out = tmp_path / "run"
    proc = run_trainer(*TINY_RUN, "--steps", "2", "--plot-every", "1", "--lr", "3e-4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "metrics.png").stat().st_size > 0
    assert proc.stdout.strip().splitlines()[-1].endswith(f"metrics.png and summary.json in {out}")
    rows = report.read_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["lr"] == 3e-4 for r in rows)
    fig = report.figure("run", rows)
    assert all(ax.get_ylabel() for ax in fig.axes)  # every panel says what it counts
    assert "no held-out prompts" in " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_the_checkpoint_loads_with_the_auto_classes_and_old_checkpoints_resume(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arpo_fast.train.demo import demo_tokenizer

    train(_tiny(tmp_path))
    model_dir = find_checkpoint(str(tmp_path / "run")) / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "<think>x</think><python>print(67 * 64)</python><result>\n4288\n</result>"
    text += "<answer>\\boxed{4288}</answer>"
    assert tok.encode(text) == demo_tokenizer().encode(text)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size == len(tok)
    # a checkpoint written before the tokenizer moved beside the model: in tokenizer/
    old = model_dir.parent / "tokenizer"
    old.mkdir()
    record_file = model_dir.parent / "complete.json"
    record = json.loads(record_file.read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(model_dir / name, old / name)
        record["files"][f"tokenizer/{name}"] = record["files"].pop(f"model/{name}")
    record_file.write_text(json.dumps(record))
    assert [m["step"] for m in train(_tiny(tmp_path, steps=2, resume=True))] == [2]
    # a run written before config.yaml existed resumes with its checkpoint's settings
    (tmp_path / "run" / "config.yaml").unlink()
    cfg = parse_config(["--out", str(tmp_path / "run"), "--resume", "true", "--steps", "3"])
    assert (cfg.steps, cfg.rollout.rollouts, cfg.demo_warm_start, cfg.tools) == (3, 2, 0, "")
    assert "--steps 2 -> 3 (from" in capsys.readouterr().out


def test_report_to_wandb_offline_writes_a_run_folder_and_resumes_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = run_trainer(*TINY_RUN, "--steps", "1", "--report-to", "wandb", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    (run,) = (out / "wandb").glob("offline-run-*")
    run_id = (out / "wandb-run-id").read_text().strip()
    assert list(run.glob(f"run-{run_id}.wandb"))
    proc = run_trainer("--out", str(out), "--resume", "true", "--steps", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))) == 2  # the same W&B run


def _mixed_rows(tmp_path):
    """The reference's train_10k mixes math and QA rows under one data_source; ability tells them
    apart."""
    rows = [
        {"prompt": f"q{i}", "ground_truth": "1", "data_source": "mixed", "ability": ability}
        for i, ability in enumerate(["math", "qa", "math", "qa"])
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_reward_key_picks_rewards_by_another_column(tmp_path, tok):
    from arpo_fast.rollout import compute_reward

    register_reward("test_one", lambda r, g, **kw: RewardResult(1.0, "one"), replace=True)
    register_reward("test_zero", lambda r, g, **kw: RewardResult(0.0, "zero"), replace=True)
    data = _mixed_rows(tmp_path)
    cfg = _tiny(
        tmp_path, data=data, reward_key="ability", reward="test_zero", reward_by_source='{"math": "test_one"}'
    )
    examples, _ = prepare(cfg, tok, 256)
    assert [e.data_source for e in examples] == ["math", "qa", "math", "qa"]
    rewards = reward_config(cfg)
    assert [compute_reward(e.data_source, "", "1", rewards).score for e in examples] == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="--reward-key difficulty: no row of --data: .* has it; its columns"):
        prepare(_tiny(tmp_path, data=data, reward_key="difficulty"), tok, 256)
    by_source = _tiny(tmp_path, data=data, reward="test_zero", reward_by_source='{"math": "test_one"}')
    with pytest.raises(ValueError, match="--reward-by-source: no example has data_source 'math'"):
        prepare(by_source, tok, 256)  # keyed on data_source, the map matches nothing


def test_eval_limit_evaluates_the_same_fixed_subset(tmp_path, tok):
    cfg = _tiny(tmp_path, eval_data="demo", eval_limit=3)
    _, held_out = prepare(cfg, tok, 256)
    _, everything = prepare(_tiny(tmp_path, eval_data="demo"), tok, 256)
    assert len(held_out) == 3 and len(everything) == 128
    assert held_out == prepare(cfg, tok, 256)[1] and all(e in everything for e in held_out)
    train(cfg)
    evals = report.split_rows(report.read_rows(tmp_path / "run"))[1]
    assert [r["eval/examples"] for r in evals] == [3, 3]
