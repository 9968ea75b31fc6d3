"""Held-out evaluation and what a run leaves behind: eval numbers on a scripted engine whose answers
are known, eval rows, summary.json and metrics.png from a tiny run, TensorBoard, the demo's splits."""

import io
import json
import sys
import types
from concurrent.futures import Future

import pytest
import torch

from arpo_fast.engine import StepOutput
from arpo_fast.rollout import Protocol, RewardConfig
from arpo_fast.rollout.tools.base import ToolResult
from arpo_fast.seeds import child_seed
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.data import Example
from arpo_fast.train.demo import demo_problems, demo_splits, demo_tokenizer
from arpo_fast.train.eval import EVAL_SEED_INDEX, evaluate
from arpo_fast.train.loop import score, train


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    """The engine's PyTorch paths, as on a user's CPU (the kernels are tested on their own)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


THINK = "<think>t</think>"
# per prompt: (ground truth, greedy answer's segments, one per tool round)
GREEDY = [
    ("2", [THINK + "<python>print(1+1)</python>", "<answer>\\boxed{2}</answer>"]),  # tool, right
    ("5", [THINK + "<answer>\\boxed{5}</answer>"]),  # right
    ("9", [THINK + "<answer>\\boxed{8}</answer>"]),  # wrong
    ("1", ["<answer>\\boxed{1}</answer>"]),
]  # no <think>
K = 4


class AnswerEngine:
    """Engine stand-in that writes a known answer per prompt: ``GREEDY``'s at temperature 0; with
    sampling, sample j of prompt p (told by its seed) is right when j < p, wrong otherwise."""

    def __init__(self, tok, eval_seed):
        self.tok, self.vocab_size, self.seqs = tok, len(tok), {}
        self.prompts = {tuple(tok.encode(f"Q{p}\n")): p for p in range(len(GREEDY))}
        self.sample_of = {
            child_seed(child_seed(eval_seed, p), j): j for p in range(len(GREEDY)) for j in range(K)
        }

    def add(self, prompt, seed=0):
        self.seqs[len(self.seqs)] = {"p": self.prompts[tuple(prompt)], "seed": seed, "round": 0, "i": 0}
        return len(self.seqs) - 1

    def extend(self, seq, ids):
        self.seqs[seq].update(round=self.seqs[seq]["round"] + 1, i=0)

    def free(self, seq):
        pass

    def fork(self, seq, n, at=None):
        raise AssertionError("an evaluation never branches")

    def _plan(self, s, greedy):
        truth, plan = GREEDY[s["p"]]
        if greedy:
            return plan
        right = self.sample_of[s["seed"]] < s["p"]
        return [THINK + f"<answer>\\boxed{{{truth if right else 'x'}}}</answer>"]

    def step(self, seqs, params=None):
        tokens = []
        for seq in seqs:
            s = self.seqs[seq]
            plan = self._plan(s, params.temperature == 0)
            ids = self.tok.encode(plan[s["round"]]) if s["round"] < len(plan) else []
            tokens.append(ids[s["i"]] if s["i"] < len(ids) else self.tok.eos_token_id)
            s["i"] += 1
        n = len(seqs)
        return StepOutput(
            torch.tensor(tokens), torch.full((n,), -0.5), torch.ones(n), torch.ones(n, dtype=torch.bool)
        )


class Calculator:
    def __init__(self):
        self.calls, self.steps = [], 0

    def submit(self, name, query):
        self.calls.append(query)
        future = Future()
        future.set_result(ToolResult(str(eval(query[len("print(") : -1], {"__builtins__": {}}))))  # noqa: S307
        return future

    def new_step(self):
        self.steps += 1


def test_eval_numbers_on_a_scripted_model():
    tok = demo_tokenizer()
    cfg = TrainConfig.from_flat(
        out="unused", eval_samples=K, eval_temperature=0.7, seed=3, max_response_tokens=48
    )
    engine = AnswerEngine(tok, child_seed(cfg.seed, EVAL_SEED_INDEX))
    run = types.SimpleNamespace(
        cfg=cfg,
        engine=engine,
        executor=Calculator(),
        tokenizer=tok,
        protocol=Protocol(tok, eos_token_ids=[tok.eos_token_id]),
        rewards=RewardConfig(),
    )
    examples = [Example(tok.encode(f"Q{p}\n"), truth, "demo") for p, (truth, _) in enumerate(GREEDY)]
    row = evaluate(run, examples, 7, score)
    assert row["step"] == 7 and row["eval/examples"] == 4
    assert row["eval/accuracy"] == 0.5  # prompts 0 (through the tool) and 1
    assert row["eval/format_ok"] == 0.75  # prompt 3 has no <think>
    assert row["eval/tool_calls"] == 0.25
    assert row["eval/reward"] == pytest.approx((1 + 1 + 0 - 1) / 4)
    assert row[f"eval/pass@{K}"] == 0.75  # prompts 1, 2 and 3 have a right sample
    assert row["eval/sampled_accuracy"] == 6 / 16  # 0 + 1 + 2 + 3 right samples of 16: pass@1
    assert row[f"eval/tool_calls@{K}"] == 0
    result = len(tok.encode(" <result>\n2\n</result>"))
    written = [sum(len(tok.encode(s)) for s in plan) for _, plan in GREEDY]
    expected = (sum(written) + result) / 4
    assert expected <= row["eval/response_tokens"] <= expected + 1  # + EOS when generating to EOS
    assert run.executor.calls == ["print(1+1)"] and run.executor.steps == 2  # a fresh step after each pass


def test_a_run_evaluates_at_step_0_and_at_the_end_and_leaves_its_summary_and_plot(tmp_path):
    cfg = TrainConfig.from_flat(
        out=str(tmp_path / "run"),
        steps=2,
        prompts_per_step=2,
        rollouts=4,
        initial=2,
        max_response_tokens=8,
        demo_warm_start=0,
        tools="",
        eval_every=1,
        eval_samples=2,
    )
    history = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1, 2] and [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert all(set(r) - {"step"} <= {k for k in r if k.startswith("eval/")} for r in evals)
    assert all(r["eval/examples"] == len(demo_problems(split="heldout")) for r in evals)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["warm_start_accuracy"] == evals[0]["eval/accuracy"]
    assert summary["final_accuracy"] == evals[-1]["eval/accuracy"] and summary["steps"] == 2
    assert summary["final_sampled_accuracy"] == evals[-1]["eval/sampled_accuracy"]
    assert summary["warm_start_sampled_accuracy"] == evals[0]["eval/sampled_accuracy"]
    test = summary["test_accuracy"]  # once, after the last step, and never in metrics.jsonl
    assert test["step"] == 2 and 0 <= test["greedy"] <= 1 and 0 <= test["sampled"] <= 1
    assert not any(k.startswith("test/") for r in rows for k in r)
    assert summary["tool_calls_per_trajectory_first"] == history[0]["tool_calls_per_traj"]
    assert summary["tool_calls_per_trajectory_last"] == history[-1]["tool_calls_per_traj"]
    assert summary["checkpoint"] == str(tmp_path / "run" / "checkpoint") and summary["wall_s"] > 0
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_can_be_switched_off_and_a_data_file_has_no_default_held_out_set(tmp_path):
    assert TrainConfig.from_flat(data=str(tmp_path / "x.jsonl")).eval_data == "none"
    assert TrainConfig.from_flat().eval_data == "demo"
    cfg = TrainConfig.from_flat(
        out=str(tmp_path / "run"),
        steps=1,
        prompts_per_step=1,
        rollouts=2,
        initial=1,
        max_response_tokens=4,
        demo_warm_start=0,
        tools="",
        eval_data="none",
    )
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and "eval/accuracy" not in rows[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["warm_start_accuracy"] is None and summary["final_accuracy"] is None


def test_report_to_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from arpo_fast.train.loop import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert main(["--report-to", "tensorboard", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "arpo_fast.train: error: --report-to tensorboard needs the tensorboard package: "
        "pip install 'arpo_fast[tensorboard]'"
    )


def test_report_to_tensorboard_writes_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = TrainConfig.from_flat(
        out=str(tmp_path / "run"),
        steps=1,
        prompts_per_step=1,
        rollouts=2,
        initial=1,
        max_response_tokens=4,
        demo_warm_start=0,
        tools="",
        report_to="tensorboard",
    )
    train(cfg)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_the_demo_splits_share_no_problem():
    splits = demo_splits()
    sizes = {"heldout": 128, "train": 1024, "warm": 4096, "test": 128}
    assert {k: len(v) for k, v in splits.items()} == sizes
    sets = {k: set(v) for k, v in splits.items()}
    assert all(len(sets[k]) == len(splits[k]) for k in splits)
    assert not sets["heldout"] & sets["train"] and not sets["heldout"] & sets["warm"]
    assert not sets["train"] & sets["warm"]
    prompts = {split: {r["prompt"] for r in demo_problems(split=split)} for split in splits}
    assert not prompts["heldout"] & (prompts["train"] | prompts["warm"])
    assert demo_splits() == splits  # fixed: every run holds out the same problems


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_bar_on_a_terminal_and_one_line_per_step_otherwise(
    tmp_path, monkeypatch, capsys, terminal
):
    from arpo_fast.train.report import Reporter

    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    cfg = TrainConfig.from_flat(out=str(tmp_path), steps=2)
    reporter = Reporter(cfg, 0, lambda row, steps: f"step {row['step']}/{steps} line")
    for step in (1, 2):
        reporter.step({"step": step, "reward": 0.5, "tool_calls_per_traj": 0.25})
    reporter.evaluation(
        {
            "step": 2,
            "eval/accuracy": 0.75,
            "eval/format_ok": 1.0,
            "eval/tool_calls": 1.0,
            "eval/response_tokens": 40.0,
            "eval/examples": 4,
            "eval/s": 0.1,
        }
    )
    reporter.close(None)
    out = capsys.readouterr().out
    assert ("step 1/2 line" in out) != terminal
    assert ("train: 100%" in stderr.getvalue()) == terminal
    assert ("reward=0.5, calls=0.25, acc=0.75" in stderr.getvalue()) == terminal
    assert "eval @ step 2: accuracy 0.75" in out
    assert json.loads((tmp_path / "summary.json").read_text())["final_accuracy"] == 0.75


def test_the_demo_evaluates_greedy_and_sampled_with_a_test_split_apart():
    """The held-out set is the demo's validation set (it chose its settings): sampled answers are
    evaluated beside the greedy one, at the rollout's temperature, and a test split of its own
    seed, disjoint from every other split, is kept for the end. A data file gets neither."""
    from arpo_fast.train.demo import SIZES, demo_splits

    demo = TrainConfig.from_flat(temperature=0.8)
    assert (demo.eval_samples, demo.eval_temperature, demo.test_data) == (4, 0.8, "demo")
    other = TrainConfig.from_flat(data="rows.jsonl", model="some/dir")
    assert (other.eval_samples, other.test_data) == (0, "none")
    splits = demo_splits()
    assert len(splits["test"]) == 128 and [len(splits[k]) for k in SIZES] == list(SIZES.values())
    pairs = [p for split in splits.values() for p in split]
    assert len(set(pairs)) == len(pairs)
    assert splits["test"] == demo_splits()["test"] and splits["test"] != demo_splits(1)["test"]


def test_the_demo_takes_several_optimizer_steps_per_step():
    """The demo's 8 prompts a step go in mini-batches of 2 (4 optimizer steps, as the reference's
    128 go in 8 of 16); a model of one's own keeps the reference's 16, and a value given stays."""
    assert TrainConfig.from_flat().update.mini_batch_prompts == 2
    assert TrainConfig.from_flat(model="some/dir").update.mini_batch_prompts == 16
    assert TrainConfig.from_flat(mini_batch_prompts=8).update.mini_batch_prompts == 8
    assert TrainConfig.from_flat(model="some/dir", clip_low=0.1).update.mini_batch_prompts == 16
