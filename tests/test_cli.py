"""The command line as a user meets it: ``--help``, one-line errors before anything slow, config
files, the run folder's config.yaml and resuming with it, threads. Subprocess runs where the
behaviour is the command line's; each trains at most two tiny steps."""

import json
from pathlib import Path

import pytest
from helpers import TINY_RUN as TINY
from helpers import run_trainer as _train

from arpo_fast.train.cli import parse_config
from arpo_fast.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "usage:" not in err, err
    return err


def test_help_is_grouped_with_choices_defaults_and_the_reference_names():
    proc = _train("--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for section in ("data:", "model:", "rollout (ARPO):", "tools:", "rewards:", "update:", "distributed:"):
        assert f"\n{section}\n" in text, section
    assert "\nevaluation:\n" in text and "\noutput:\n" in text
    assert "--advantage {soft,hard}" in text and "--dtype {auto,bf16,fp16,fp32}" in text
    assert "--resume {true,false,auto}" in text
    flat = " ".join(text.split())
    assert "(verl: data.train_batch_size)" in flat and "(verl: actor_rollout_ref.rollout.n)" in flat
    assert "--lr LR AdamW learning rate (auto:" in flat and "[default: auto]" in flat
    assert "0 means" not in flat and "(0: the" not in flat
    assert "1 - --clip-low" in flat  # settings are named by their flags, not their field names
    from arpo_fast.train.flags import all_flags

    fields = {f.name for f in all_flags() if "_" in f.name}
    assert not [w for w in flat.replace(",", " ").replace(".", " ").split() if w in fields]
    assert [f.name for f in all_flags() if f.section == "other"] == []  # every flag has its section


def test_steps_0_and_an_unknown_flag_print_one_line():
    err = _one_line_error(_train("--steps", "0"))
    assert "--steps must be >= 1, got 0" in err
    err = _one_line_error(_train("--stesp", "3"))
    assert "--stesp: no such flag (did you mean --steps?)" in err


def test_the_data_is_checked_against_the_model_before_it_loads(tmp_path):
    """A prompt longer than the context the model's config gives fails in seconds: the 100,000
    warm-start steps that would come first are never taken."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "7 " * 400, "ground_truth": "7"}) + "\n")
    out = tmp_path / "run"
    proc = _train("--data", str(data), "--demo-warm-start", "100000", "--out", str(out), timeout=120)
    err = _one_line_error(proc)
    assert f"--data: {data}: example 1 has" in err and "more than the model's 255" in err
    assert not out.exists()


def test_a_model_the_engine_cannot_run_fails_from_its_config_alone(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")  # a config.json and no weights
    err = _one_line_error(_train("--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "run")))
    assert "model type 'gpt2' is not one the engine runs (llama, qwen2, qwen3)" in err


def test_a_misspelt_reward_names_the_flag_and_the_closest_name(tmp_path, capsys):
    from arpo_fast.train.loop import main

    assert main(["--reward", "arpo_fl", "--out", str(tmp_path / "run")]) == 2
    assert "--reward: no reward named 'arpo_fl' (did you mean arpo_f1?)" in capsys.readouterr().err


def test_config_files_are_read_and_flags_override_them(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(
        "steps: 7\nmax-response-tokens: 32\nclip_high: 0.28\nlr: 1.0e-5\ntools: [python, search]\n"
        "tool_settings: {search: {corpus_path: wiki.jsonl}}\nreport_to: none\neval_data: auto\n"
    )
    cfg = parse_config(["--config", str(path), "--steps", "9", "--out", str(tmp_path / "o")])
    assert (cfg.steps, cfg.rollout.max_response_tokens, cfg.update.clip_high, cfg.lr) == (9, 32, 0.28, 1e-5)
    assert cfg.tools == "python,search" and json.loads(cfg.tool_settings) == {
        "search": {"corpus_path": "wiki.jsonl"}
    }
    for text, message in (
        ("stesp: 3\n", "unknown setting 'stesp' (did you mean steps?)"),
        ("steps: many\n", "steps: expected an integer, got 'many'"),
        ("steps: [1\n", "not valid YAML"),
        ("- steps\n", "expected a mapping of setting: value"),
        ("steps: 0\n", "--steps must be >= 1, got 0"),
    ):
        path.write_text(text)
        with pytest.raises(SystemExit):
            parse_config(["--config", str(path)])
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert text.startswith("steps: 0") or f"--config {path}" in err
    with pytest.raises(SystemExit):
        parse_config(["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml: No such file" in capsys.readouterr().err


def test_the_saved_config_is_a_valid_config_file(tmp_path):
    from arpo_fast.train import run_config

    cfg = TrainConfig.from_flat(
        out=str(tmp_path),
        steps=3,
        rollouts=4,
        initial=2,
        tool_settings='{"python": {"timeout": 5}}',
        tools="",
    )
    run_config.save(cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert "\nlr: auto  # 0.0001\n" in text and "\neval_data: auto  # demo\n" in text
    assert "\nout:" not in text and "\nresume:" not in text
    again = parse_config(["--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path)])
    assert again == cfg
    mine = tmp_path / "mine"  # a config.yaml this project did not write is never replaced
    mine.mkdir()
    (mine / "config.yaml").write_text("steps: 3\n")
    with pytest.raises(ValueError, match="config.yaml exists and was not written by arpo_fast"):
        run_config.save(TrainConfig.from_flat(out=str(mine)))
    assert (mine / "config.yaml").read_text() == "steps: 3\n"


def test_auto_settings_resolve_per_job_in_one_place():
    demo, own = TrainConfig(out="x"), TrainConfig(out="x", model="/m", data="d.jsonl")
    assert (demo.lr, demo.eval_data, own.lr, own.eval_data) == (1e-4, "demo", 1e-6, "none")
    assert demo.auto_settings >= {"lr", "eval_data", "tokenizer", "kv_memory_mb"}
    assert TrainConfig(out="x", lr=3e-6).lr == 3e-6
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(out="x", lr=0.0)  # 0 no longer stands for auto
    assert parse_config(["--lr", "auto", "--out", "x"]).lr == 1e-4


def test_resume_restores_the_runs_settings_and_lists_what_the_flags_change(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    first = _train(*TINY, "--steps", "1", "--report-to", "tensorboard", "--out", str(out))
    assert first.returncode == 0, first.stderr
    (out / "tensorboard").rename(tmp_path / "tensorboard-1")
    proc = _train("--out", str(out), "--resume", "true", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming {out} with --steps 1 -> 2 (from {out / 'config.yaml'})" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["trajectories"] == 2  # --rollouts 2 kept
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # --report-to tensorboard kept
    assert "steps: 2" in (out / "config.yaml").read_text()


def test_the_demo_picks_its_thread_count_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    import re

    from arpo_fast.train.demo import threads

    assert [threads(load, 2) for load in (0.0, 0.4, 0.6, 1.5, 12.0)] == [2, 2, 1, 1, 1]
    assert threads(2.2, 8) == 6  # the cores other work leaves free
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert TrainConfig(out="x").cpu_threads >= 1 and TrainConfig(out="x", model="/m").cpu_threads is None
    proc = _train(*TINY, "--steps", "1", "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^torch intra-op threads: \d+ \(--cpu-threads\)$", proc.stdout, re.M), proc.stdout
    proc = _train(*TINY, "--steps", "1", "--out", str(tmp_path / "b"), env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0 and "intra-op threads" not in proc.stdout + proc.stderr


def test_the_readme_says_how_to_get_the_cpu_and_the_cuda_build_of_torch():
    readme = (ROOT / "README.md").read_text()
    assert "pins a CPU build" not in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "OMP_NUM_THREADS" in readme
