"""The training loop: the demo end to end, resuming, checkpoints, data and config errors, the update.

The kernels are tested on their own; here they take their PyTorch paths (TRITON_INTERPRET=0 at call
time), as on a user's CPU, so a few training steps take seconds.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import small_config

from arpo_fast.rollout import RewardResult, register_reward
from arpo_fast.rollout.responses import Response, assemble_tree
from arpo_fast.train import report
from arpo_fast.train.checkpoint import CheckpointError, find_checkpoint, load_trainer_state
from arpo_fast.train.cli import build_parser, parse_config
from arpo_fast.train.data import encode_prompt, load_examples, read_rows, step_batch
from arpo_fast.train.demo import demo_model, demo_tokenizer
from arpo_fast.train.loop import main, train
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.padded import micro_batches, pack, token_logprobs
from arpo_fast.train.update import UpdateConfig, UpdateData, update


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _small(tmp_path, **kw):  # longer responses; the demo's held-out evaluation (auto)
    return small_config(**({"out": tmp_path / "run", "max_response_tokens": 24, "eval_data": None} | kw))


def test_demo_trains_end_to_end_with_tools_and_branches(tmp_path):
    cfg = _small(tmp_path, tools="python", max_response_tokens=64, demo_warm_start=100, threshold=1.0)
    history = train(cfg)
    assert [m["step"] for m in history] == [1, 2]
    steps, evals = report.split_rows(report.read_rows(tmp_path / "run"))
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]  # the demo's held-out set
    assert sum(m["tool_calls"] for m in history) > 0  # the warmed-up model calls python
    assert sum(m["branch_points"] for m in history) > 0 and sum(m["shared_tokens"] for m in history) > 0
    assert all(m["trajectories"] == 8 for m in history)
    assert any(m["grad_norm"] > 0 for m in history)
    ckpt = find_checkpoint(cfg.out)
    assert load_trainer_state(ckpt)["step"] == 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    text = "<python>print(67 * 64)</python>"
    assert AutoTokenizer.from_pretrained(ckpt / "model").encode(text) == demo_tokenizer().encode(text)
    assert model.config.vocab_size == len(demo_tokenizer())


@pytest.fixture
def length_data(tmp_path):
    """Four prompts whose reward is the response's length in characters / 100: it varies even for
    a random model, so every step really updates the weights."""
    register_reward(
        "test_length", lambda response, truth, **kw: RewardResult(len(response) / 100, "length"), replace=True
    )
    path = tmp_path / "length.jsonl"
    rows = [
        {"prompt": f"Say something, {i}.\n", "ground_truth": "", "data_source": "test_length"}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the fp32 masters must come back too
def test_resume_gives_the_same_steps_as_an_uninterrupted_run(tmp_path, length_data, dtype):
    kw = dict(lr=1e-3, data=length_data, reward="test_length", dtype=dtype)
    whole = train(_small(tmp_path / "a", steps=3, **kw))
    train(_small(tmp_path / "b", steps=1, **kw))
    resumed = train(_small(tmp_path / "b", steps=3, resume=True, **kw))
    assert [m["step"] for m in resumed] == [2, 3]
    assert all(m["grad_norm"] > 0 for m in whole)
    keys = ("reward", "response_tokens", "loss", "grad_norm", "entropy")
    for a, b in zip(whole[1:], resumed):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-5)
    assert len((tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    # a crash while step 4's line was being written: resuming drops the cut line and redoes step 4
    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "rew')
    train(_small(tmp_path / "b", steps=4, resume=True, **kw))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_corrupt_checkpoint_is_reported_and_left_alone(tmp_path):
    cfg = _small(tmp_path, steps=1)
    train(cfg)
    state = tmp_path / "run" / "checkpoint" / "trainer.pt"
    size = state.stat().st_size
    state.write_bytes(b"not a checkpoint")  # cut short: its recorded size tells
    with pytest.raises(CheckpointError, match="is damaged: trainer.pt has 16 bytes.*left untouched"):
        train(_small(tmp_path, steps=2, resume=True))
    assert state.read_bytes() == b"not a checkpoint"
    state.write_bytes(b"x" * size)  # the same size: reading it tells
    with pytest.raises(CheckpointError, match="cannot read the checkpoint .*trainer.pt.*left untouched"):
        train(_small(tmp_path, steps=2, resume=True))
    torch.save({"step": "x"}, state)
    with pytest.raises(CheckpointError, match="not an arpo_fast checkpoint"):
        load_trainer_state(state.parent)


def test_an_earlier_run_is_never_overwritten(tmp_path, capsys):
    train(_small(tmp_path, steps=1))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume true"):
        train(_small(tmp_path, steps=1))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert main(["--out", str(tmp_path / "run"), "--demo-warm-start", "0"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no checkpoint in"):
        train(_small(tmp_path / "empty", resume=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reward": "nope"}, "no reward named 'nope'"),
        ({"reward_by_source": '{"a": "nope"}'}, "no reward named 'nope'"),
        ({"reward_by_source": "[1]"}, "--reward-by-source must be a JSON object"),
        ({"tool_settings": "{oops"}, "--tool-settings: not valid JSON"),
        ({"tools": "python", "tool_settings": '{"search": {}}'}, "not in --tools: search"),
        ({"tools": "calculator"}, "no tool named 'calculator'"),
        ({"model": "/nonexistent/model"}, "not 'demo' and not a local model directory"),
        ({"data": "/nonexistent/data.jsonl"}, "data.jsonl: no such file"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(tmp_path, kwargs, match):
    with pytest.raises((ValueError, KeyError, OSError), match=match):
        train(_small(tmp_path, **kwargs))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_runs_and_rejects_bad_values(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert (
        main(
            [
                "--steps",
                "1",
                "--prompts-per-step",
                "1",
                "--rollouts",
                "2",
                "--initial",
                "1",
                "--max-response-tokens",
                "8",
                "--demo-warm-start",
                "0",
                "--tools",
                "",
                "--out",
                out,
            ]
        )
        == 0
    )
    assert "step 1/1" in capsys.readouterr().out
    for argv, message in (
        (["--steps", "0"], "--steps must be >= 1"),
        (["--initial", "9", "--rollouts", "4"], "initial"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--advantage", "mean"], "--advantage must be"),
        (["--resume", "maybe"], "expected true or false"),
        (["--clip-low", "1"], "--clip-low must be < 1"),
        (["--dual-clip", "0.5"], "--dual-clip must be > 1"),
        (["--micro-batch-tokens", "0"], "--micro-batch-tokens must be >= 1"),
    ):
        with pytest.raises(SystemExit):
            parse_config(argv)
        assert message in capsys.readouterr().err
    assert parse_config(["--resume", "true", "--out", out]).resume is True
    with pytest.raises(SystemExit):
        parse_config(["--resume", "true"])
    assert "resume needs --out" in capsys.readouterr().err
    assert parse_config([]).out.startswith("runs/arpo-")  # each default run gets a new directory
    cfg = parse_config(["--rollouts", "10", "--clip-high", "0.28", "--steps", "5", "--out", out])
    assert (cfg.rollout.rollouts, cfg.rollout.max_response_tokens) == (10, 64)
    assert (cfg.update.clip_high, cfg.update.clip_low, cfg.steps) == (0.28, 0.2, 5)
    from arpo_fast.train.flags import all_flags

    assert [f.name for f in all_flags() if not f.help.strip()] == []  # every flag explained
    help_text = build_parser().format_help()
    assert "--max-response-tokens" in help_text and "tool results included" in help_text


def test_data_errors_name_the_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    cases = [
        ('{"prompt": "hi", "ground_truth": "1"}\n{oops\n', "d.jsonl:2: not valid JSON"),
        ('{"prompt": "hi"}\n', "d.jsonl:1: 'ground_truth'"),
        ('{"prompt": [], "ground_truth": "1"}\n', "d.jsonl:1: 'prompt'"),
        ("[1, 2]\n", "d.jsonl:1: expected a JSON object"),
        ("\n\n", "no examples"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_rows(str(path))
    path.write_text(json.dumps({"prompt": "x " * 50, "ground_truth": ["a", "b"]}) + "\n")
    with pytest.raises(ValueError, match="example 1 has .* prompt tokens, more than the model's 10"):
        load_examples(str(path), tok, max_prompt_tokens=10)
    (example,) = load_examples(str(path), tok)
    assert example.data_source == "default" and example.ground_truth == ["a", "b"]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert encode_prompt(tok, messages) == tok.encode("S\nU\n")  # no chat template: joined
    templated = demo_tokenizer()
    templated.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert encode_prompt(templated, messages) == tok.encode("<system>S\n<user>U\n<assistant>")


def test_step_batches_cover_every_example_once_per_epoch():
    seen = [i for step in range(5) for i in step_batch(10, 2, step, seed=3)]
    assert sorted(seen) == list(range(10))
    assert step_batch(10, 2, 7, seed=3) == step_batch(10, 2, 7, seed=3)
    assert seen != [i for step in range(5) for i in step_batch(10, 2, step, seed=4)]


def test_micro_batches_stay_within_the_token_budget():
    lengths = [5, 40, 7, 12, 100, 3, 33]
    groups = micro_batches(lengths, 64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 64


def _trajectories(tok, prompts=(0, 0)):
    prompt = tok.encode("Problem: what is 2 + 2?\n")
    good, bad = tok.encode("<answer>\\boxed{4}</answer>"), tok.encode("<answer>\\boxed{5}</answer>")
    tool = tok.encode(" <result>\n4\n</result>")
    return [
        Response(prompts[0], prompt, response_ids=good + tool, loss_mask=[1] * len(good) + [0] * len(tool)),
        Response(prompts[1], prompt, response_ids=bad, loss_mask=[1] * len(bad)),
    ]


def _sequence_logprob(model, tok, trajs):
    with torch.no_grad():
        batch = pack(trajs, list(range(len(trajs))), tok.pad_token_id, "cpu")
        lp = token_logprobs(model, batch, 1.0)[0]
    sizes = [len(t.response_ids) for t in trajs]
    masks = batch.loss_mask.split(sizes)
    return [float(x[m].sum()) for x, m in zip(lp.split(sizes), masks)]


@pytest.mark.parametrize("mini_batch_prompts", [16, 1])
def test_update_moves_probability_toward_the_better_answer(tok, mini_batch_prompts):
    model = demo_model(tok, seed=1).eval()
    tree = assemble_tree(_trajectories(tok, prompts=(0, 1)))
    trajs = tree.trajectories
    before = _sequence_logprob(model, tok, trajs)
    adv = [torch.full((len(t.response_ids),), a) for t, a in zip(trajs, (1.0, -1.0))]
    optimizer = MasterWeights(
        model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.05)
    )  # along the gradient
    cfg = UpdateConfig(mini_batch_prompts=mini_batch_prompts, micro_batch_tokens=40)
    metrics = update(model, optimizer, UpdateData(tree, adv, tok.pad_token_id), cfg)
    after = _sequence_logprob(model, tok, trajs)
    assert after[0] > before[0] and after[1] < before[1]
    assert metrics["tokens"] == sum(sum(t.loss_mask) for t in trajs) and metrics["skipped_updates"] == 0
    assert metrics["optimizer_steps"] == (1 if mini_batch_prompts == 16 else 2)


def test_mini_batches_are_whole_groups_of_prompts():
    from arpo_fast.train.update import mini_batches

    prompts = [0, 0, 0, 1, 1, 2, 3, 3, 4]
    assert mini_batches(prompts, 2) == [[0, 1, 2, 3, 4], [5, 6, 7], [8]]
    assert mini_batches(prompts, 16) == [list(range(9))]
    # the reference's shape: 128 prompts in mini-batches of 16 are 8 optimizer steps
    assert len(mini_batches([p for p in range(128) for _ in range(16)], 16)) == 8
    assert UpdateConfig().mini_batch_prompts == 16


def test_the_logged_loss_is_the_token_mean_over_the_step(tok):
    """Micro-batches of different sizes: the logged loss is that of the whole batch at once, not the
    plain mean of the micro-batches' losses."""
    tree = assemble_tree(
        _trajectories(tok) + [Response(1, tok.encode("Q\n"), response_ids=[5], loss_mask=[1])]
    )
    trajs = tree.trajectories
    adv = [torch.full((len(t.response_ids),), a) for t, a in zip(trajs, (1.0, -1.0, 0.5))]
    losses = []
    for tokens in (10_000, 1):  # one micro-batch; one trajectory each
        model = demo_model(tok, seed=1).eval()
        optimizer = MasterWeights(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.0))
        data = UpdateData(tree, adv, tok.pad_token_id)
        metrics = update(model, optimizer, data, UpdateConfig(micro_batch_tokens=tokens))
        losses.append(metrics["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _with_rollout_logprobs(model, tok, responses, offset):
    """``responses`` whose rollout log-probs are the trainer's plus ``offset(i)`` at token i."""
    trajs = assemble_tree(responses).trajectories
    with torch.no_grad():
        lp = token_logprobs(model, pack(trajs, list(range(len(trajs))), tok.pad_token_id, "cpu"), 1.0)[0]
    for r, values in zip(responses, lp.split([len(t.response_ids) for t in trajs])):
        r.logprobs = [v + offset(i) for i, v in enumerate(values.tolist())]
    return responses


def test_the_rollout_trainer_mismatch_is_measured(tok):
    model = demo_model(tok, seed=1).eval()
    responses = _with_rollout_logprobs(model, tok, _trajectories(tok), lambda i: 0.3 if i == 0 else -0.01)
    responses[1].logprobs[1] = float("nan")  # a token the sampler did not draw is left out
    tree = assemble_tree(responses)
    trajs = tree.trajectories
    adv = [torch.zeros(len(t.response_ids)) for t in trajs]
    optimizer = MasterWeights(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.0))
    m = update(model, optimizer, UpdateData(tree, adv, tok.pad_token_id), UpdateConfig())
    n = sum(sum(t.loss_mask) for t in trajs) - 1
    assert m["logprob_mismatch_max"] == pytest.approx(0.3, abs=1e-5)
    assert m["logprob_mismatch_share"] == pytest.approx(2 / n)
    assert m["logprob_mismatch_mean"] == pytest.approx((0.6 + 0.01 * (n - 2)) / n, abs=1e-5)


def test_truncated_importance_sampling_weights_each_token(tok):
    """Rollout log-probs log 2 below the trainer's: every token's weight is min(2, cap), so one
    SGD step moves the weights by that factor times the step without the correction."""
    deltas = {}
    for cap in (0.0, 1.5, 4.0):
        model = demo_model(tok, seed=1).eval()
        tree = assemble_tree(_with_rollout_logprobs(model, tok, _trajectories(tok), lambda i: -math.log(2)))
        trajs = tree.trajectories
        before = [p.detach().clone() for p in model.parameters()]
        adv = [torch.full((len(t.response_ids),), a) for t, a in zip(trajs, (1.0, -1.0))]
        optimizer = MasterWeights(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.01))
        data = UpdateData(tree, adv, tok.pad_token_id)
        m = update(model, optimizer, data, UpdateConfig(rollout_is_cap=cap, grad_clip=0.0))
        deltas[cap] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        if cap:
            assert m["is_weight"] == pytest.approx(min(2.0, cap), rel=1e-4)
    # parameters move in fp32 steps: compare to within a few ulps of the weights themselves
    torch.testing.assert_close(deltas[1.5], 1.5 * deltas[0.0], rtol=1e-3, atol=5e-7)
    torch.testing.assert_close(deltas[4.0], 2.0 * deltas[0.0], rtol=1e-3, atol=5e-7)


def test_update_with_tool_tokens_only_masked_out_changes_nothing_through_them(tok):
    """Tool-result tokens carry no gradient: a trajectory whose loss mask is all zero leaves the
    weights as they were."""
    model = demo_model(tok, seed=2).eval()
    prompt = tok.encode("Q\n")
    tool = tok.encode(" <result>\n4\n</result>")
    tree = assemble_tree([Response(0, prompt, response_ids=tool, loss_mask=[0] * len(tool))])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = MasterWeights(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=1.0))
    update(
        model,
        optimizer,
        UpdateData(tree, [torch.ones(len(tool))], tok.pad_token_id),
        UpdateConfig(grad_clip=0.0),
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_non_finite_gradient_skips_the_step_and_keeps_the_weights(tok):
    model = demo_model(tok, seed=2).eval()
    tree = assemble_tree(_trajectories(tok))
    trajs = tree.trajectories
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")  # every hidden state, and so the loss, breaks
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = MasterWeights(model.parameters(), lr=1e-2)
    adv = [torch.ones(len(t.response_ids)) for t in trajs]
    metrics = update(model, optimizer, UpdateData(tree, adv, tok.pad_token_id), UpdateConfig())
    assert metrics["skipped_updates"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.gpu
def test_training_steps_on_cuda_in_bf16(tmp_path):
    """The whole loop on a GPU: CUDA-graph decode in the rollout, the Triton log-prob kernel in the
    update, bf16 weights."""
    history = train(
        _small(
            tmp_path, device="cuda", dtype="bf16", tools="python", demo_warm_start=100, max_response_tokens=48
        )
    )
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in history)
    assert any(m["grad_norm"] > 0 for m in history)


@pytest.mark.gpu
def test_reference_semantics_kl_and_importance_sampling_on_cuda(tmp_path):
    """The reference's branching rule (top-10 entropies read off CUDA-graph replays), the KL term
    and truncated importance sampling, on a GPU in bf16: the rollout/trainer mismatch is small."""
    history = train(
        _small(
            tmp_path,
            device="cuda",
            dtype="bf16",
            tools="python",
            demo_warm_start=100,
            max_response_tokens=48,
            arpo_semantics="reference",
            kl_coef=0.01,
            rollout_is_cap=2.0,
        )
    )
    assert all(torch.isfinite(torch.tensor([m["loss"], m["kl"], m["is_weight"]])).all() for m in history)
    assert all(m["logprob_mismatch_mean"] < 0.05 for m in history)


def test_move_model_keeps_rotary_frequencies_in_fp32(tok, tmp_path):
    """As from_pretrained does: a saved and reloaded bf16 model then computes the same logits."""
    from transformers import AutoModelForCausalLM

    from arpo_fast.train.demo import move_model

    model = move_model(demo_model(tok, seed=4), "cpu", torch.bfloat16).eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    ids = torch.tensor([tok.encode("Problem: what is 12 + 30?\n" * 4)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_tool_tags_follow_the_tools_of_the_run(tmp_path, tok):
    """A registered tool is called by its own tag; the usual tags stay recognised, and a call to a
    tool the run lacks reads back an error naming the available ones."""
    from arpo_fast.rollout.tools import register_tool
    from arpo_fast.rollout.tools.base import ToolResult
    from arpo_fast.train.loop import setup

    class Calculator:
        name = "calculator"

        def __call__(self, query):
            return ToolResult(str(eval(query, {"__builtins__": {}})))  # noqa: S307 - test input

    register_tool("calculator", Calculator, replace=True)
    run = setup(_small(tmp_path, tools="calculator"))
    try:
        assert set(run.protocol.config.tool_names) == {"search", "python", "calculator"}
        events = {}
        for text in ("<calculator>6*7</calculator>", "<python>print(1)</python>"):
            traj = run.protocol.new_trajectory()
            for token in run.tokenizer.encode(text):
                event = traj.feed(token)
                if event is not None:
                    events[text] = event
        call = events["<calculator>6*7</calculator>"].call
        assert call.ok and call.name == "calculator" and run.executor.run(call.name, call.body).text == "42"
        assert (
            "Unknown tool 'python'; available: calculator" in events["<python>print(1)</python>"].call.error
        )
    finally:
        run.executor.shutdown()


def test_folders_the_project_did_not_write_are_never_removed(tmp_path):
    from arpo_fast.train.checkpoint_save import Checkpointer

    run = tmp_path / "run"
    for name in ("checkpoint", "checkpoint.old"):
        (run / name).mkdir(parents=True)
        (run / name / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a run folder of arpo_fast"):
        train(_small(tmp_path, steps=1))
    # a save beside a folder named like a checkpoint that is not ours refuses and touches nothing
    with pytest.raises(CheckpointError, match="not written by arpo_fast"):
        Checkpointer(run).save(1, None, None, None, {})
    for name in ("checkpoint", "checkpoint.old"):
        assert (run / name / "mine.txt").read_text() == "user data"
    # resuming a run of ours beside a stranger's checkpoint.tmp refuses before training
    other = tmp_path / "other"
    train(_small(tmp_path, steps=1, out=str(other)))
    (other / "checkpoint.tmp").mkdir()
    (other / "checkpoint.tmp" / "keep").write_text("x")
    before = (other / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="checkpoint.tmp exists but was not written"):
        train(_small(tmp_path, steps=2, out=str(other), resume=True))
    assert (other / "checkpoint.tmp" / "keep").read_text() == "x"
    assert (other / "metrics.jsonl").read_text() == before


def test_a_failed_resume_changes_nothing(tmp_path):
    import shutil

    cfg = _small(tmp_path, steps=2, save_every=1)
    train(cfg)
    run = tmp_path / "run"
    metrics = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoint" / "model")
    with pytest.raises(CheckpointError, match="incomplete: .*model/config.json.*is missing"):
        train(_small(tmp_path, steps=3, resume=True))
    assert (run / "metrics.jsonl").read_text() == metrics  # no row was dropped


def test_a_resumed_kl_run_checks_its_reference_model_first(tmp_path):
    """With --kl-coef a resumed run loads --model again as the reference: a bad one fails before
    anything changes."""
    train(_small(tmp_path, steps=1, kl_coef=0.05, eval_data="none"))
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="--model '/nonexistent': not 'demo' and not a local model"):
        train(_small(tmp_path, steps=2, kl_coef=0.05, eval_data="none", resume=True, model="/nonexistent"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_errors_are_one_line_naming_the_file_or_flag(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    no_weights = tmp_path / "no_weights"  # a model folder whose weights are missing
    demo_model(demo_tokenizer(), seed=0).config.save_pretrained(no_weights)
    demo_tokenizer().save_pretrained(no_weights)
    base = ["--demo-warm-start", "0", "--steps", "1"]
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], f"--data: {tmp_path / 'missing.jsonl'}: no such file"),
        (["--data", str(folder)], f"--data: {folder}: is a directory"),
        (["--out", str(afile)], f"--out {afile}: exists and is not a directory"),
        (["--tool-settings", "[" * 100_000 + "]" * 100_000], "--tool-settings: JSON nested too deeply"),
        (
            ["--tool-settings", '{"python": 5}'],
            "--tool-settings: the settings of 'python' must be a JSON object",
        ),
        (["--tool-settings", '{"python": {"bogus": 1}}'], "--tool-settings: python:"),
        (["--model", str(folder)], f"--model {folder}: no config.json there"),
        (["--model", str(no_weights)], f"--model {no_weights}: cannot load it ("),
        (["--tokenizer", str(folder)], "--tokenizer: the demo model builds its own tokenizer"),
    ]
    for n, (argv, message) in enumerate(cases):
        out = ["--out", str(tmp_path / f"run{n}")] if "--out" not in argv else []
        assert main(base + out + argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out or not Path(out[1]).exists()  # a failed setup leaves no run folder behind
    with pytest.raises(SystemExit):
        main(base + ["--device", "gpu"])
    assert "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err


def test_the_kl_penalty_to_the_starting_policy(tok, tmp_path):
    import copy

    model = demo_model(tok, seed=1).eval()
    kl_model = copy.deepcopy(model)
    tree = assemble_tree(_trajectories(tok))
    trajs = tree.trajectories
    adv = [torch.zeros(len(t.response_ids)) for t in trajs]
    optimizer = MasterWeights(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.0))
    cfg = UpdateConfig(kl_coef=0.5)
    data = UpdateData(tree, adv, tok.pad_token_id)
    assert update(model, optimizer, data, cfg, kl_model=kl_model)["kl"] == 0.0
    with torch.no_grad():
        for p in kl_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = update(model, optimizer, data, cfg, kl_model=kl_model)
    assert m["kl"] > 0 and m["loss"] == pytest.approx(0.5 * m["kl"], rel=1e-5)  # advantages are zero
    with pytest.raises(ValueError, match="needs the reference policy"):
        update(model, optimizer, data, cfg)
    # in a run: the starting policy is held and the penalty logged
    assert "kl" in train(_small(tmp_path, steps=1, kl_coef=0.1))[0]
