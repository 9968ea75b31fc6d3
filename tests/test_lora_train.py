"""A LoRA run of the trainer (arpo_fast/train/lora_run.py): the flags, what trains, the KL model,
checkpoints that PEFT and transformers load, and a resume that restores adapters and optimizer
exactly (the demo model, CPU, PyTorch paths)."""

import json

import pytest
import torch
from helpers import small_config
from safetensors.torch import load_file

from arpo_fast.rollout import RewardResult, register_reward
from arpo_fast.train.checkpoint import CheckpointError, find_checkpoint
from arpo_fast.train.cli import parse_config
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.demo import demo_model, demo_tokenizer
from arpo_fast.train.loop import setup, train
from arpo_fast.train.lora import adapter_parameters
from arpo_fast.train.lora_run import BaseKLModel, check

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def length_data(tmp_path):
    """Prompts whose reward is the response's length: it varies, so every step moves the adapters."""
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


def _cfg(out, **kw):
    return small_config(out, **({"lora_rank": 4} | kw))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-rank", "-1"], "--lora-rank must be an integer >= 0"),
        (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
        (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (["--lora-targets", "q_proj,lm_head"], "--lora-targets has an unknown projection 'lm_head'"),
        (["--lora-targets", "q_proj,q_proj"], "--lora-targets names a projection twice"),
        (["--save-merged", "true"], "--save-merged needs --lora-rank"),
    ],
)
def test_bad_lora_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len([line for line in err if "error:" in line]) == 1


def test_lora_settings_and_their_auto_learning_rate():
    cfg = TrainConfig.from_flat(out="-", lora_rank=8, lora_targets="q_proj,v_proj")
    assert cfg.lr == 1e-3  # the demo's LoRA rate
    assert TrainConfig.from_flat(out="-", lora_rank=8, model="/m").lr == 1e-5
    assert TrainConfig.from_flat(out="-", lora_rank=8, lr=2e-4).lr == 2e-4
    assert TrainConfig.from_flat(out="-").lr == 1e-4  # without LoRA: unchanged


def test_lora_without_peft_is_refused_in_one_line(monkeypatch):
    check(_cfg("-"), True, None)  # torchrun: supported (tests/test_lora_distributed.py)
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if not installed
    with pytest.raises(ValueError, match=r"^--lora-rank: LoRA needs peft: pip install 'arpo_fast\[lora\]'"):
        check(_cfg("-"), False, None)


def test_setup_trains_the_adapters_only_and_the_kl_model_is_the_base(tmp_path):
    run = setup(_cfg(tmp_path / "run", kl_coef=0.1))
    adapters = {id(p) for _, p in adapter_parameters(run.model)}
    assert adapters and {id(p) for p in run.optimizer.params} == adapters
    assert all(not p.requires_grad for n, p in run.model.named_parameters() if id(p) not in adapters)
    assert isinstance(run.kl_model, BaseKLModel) and run.kl_model.policy is run.model  # no copy
    with torch.no_grad():  # adapters moved off zero: the KL model still runs the base
        for _, p in adapter_parameters(run.model):
            p.add_(torch.randn_like(p) * 0.5)
    base = demo_model(demo_tokenizer(), seed=0).eval()
    ids = torch.tensor([[1, 5, 9, 17, 3, 41]])

    class Logits:  # a stand-in batch: the update calls batch.run(policy, ...)
        def run(self, policy, *args):
            return policy(ids).logits

    with torch.no_grad():
        ref = run.kl_model(Logits(), 1.0)
        policy = run.scorer(Logits(), 1.0)
        want = base(ids).logits
    assert torch.allclose(ref, want, atol=1e-6) and not torch.allclose(policy, want, atol=1e-3)
    assert any(p.requires_grad for _, p in adapter_parameters(run.model))  # flags came back
    from arpo_fast.engine.lora import LoraLinear  # the engine, built after add_lora, applies them

    assert all(isinstance(p, LoraLinear) for layer in run.engine.model.projections for p in layer)


def _dropout_run(tmp_path):
    """(run, batch): a run with adapter dropout 0.5 and adapters moved off zero, and a batch whose
    ``run`` gives the policy's logits on a fixed prompt."""
    run = setup(_cfg(tmp_path / "run", lora_dropout=0.5))
    with torch.no_grad():
        for _, p in adapter_parameters(run.model):
            p.add_(torch.randn_like(p))
    ids = torch.tensor([[1, 5, 9, 17, 3, 41]])

    class Logits:
        def run(self, policy, *args):
            return policy(ids).logits

    return run, Logits()


def test_adapter_dropout_acts_in_gradient_forwards_only(tmp_path):
    run, batch = _dropout_run(tmp_path)
    with torch.no_grad():
        plain = [run.scorer(batch, 1.0) for _ in range(2)]
    dropped = [run.scorer(batch, 1.0).detach() for _ in range(2)]
    assert torch.equal(plain[0], plain[1]) and not torch.allclose(dropped[0], dropped[1])
    with torch.no_grad():
        assert torch.equal(run.scorer(batch, 1.0), plain[0])  # the mode follows each call


def _adapter_and_optimizer(out):
    ckpt = find_checkpoint(out)
    state = torch.load(ckpt / "trainer.pt", weights_only=True)["optimizer"]["optimizer"]["state"]
    return load_file(ckpt / "adapter" / "adapter_model.safetensors"), state


@pytest.mark.parametrize("source", ["demo", "model_dir"])
def test_resume_restores_adapters_and_optimizer_exactly(tmp_path, length_data, source):
    kw = dict(data=length_data, reward="test_length", lr=1e-2, kl_coef=0.05)
    if source == "model_dir":  # the base is --model's, loaded again on resume (not saved)
        folder = tmp_path / "base_model"
        demo_model(demo_tokenizer(), seed=3).save_pretrained(folder)
        demo_tokenizer().save_pretrained(folder)
        kw["model"] = str(folder)
    whole = train(_cfg(tmp_path / "a", **kw))
    train(_cfg(tmp_path / "b", steps=1, **kw))
    resumed = train(_cfg(tmp_path / "b", resume=True, **kw))
    assert [m["step"] for m in resumed] == [2] and all(m["grad_norm"] > 0 for m in whole)
    (wa, sa), (wb, sb) = _adapter_and_optimizer(tmp_path / "a"), _adapter_and_optimizer(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k)  # the adapters did move
    assert sa.keys() == sb.keys()
    for i in sa:
        assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for k in sa[i])
    assert (find_checkpoint(tmp_path / "b") / "base").is_dir() == (source == "demo")


def test_resume_with_dropout_draws_the_masks_of_an_uninterrupted_run(tmp_path, length_data):
    """The masks come from (seed, step, rank), not from torch's global generator: 2 steps equal
    1 step and a resumed one, and they differ from the same run without dropout."""
    kw = dict(data=length_data, reward="test_length", lr=1e-2, lora_dropout=0.3)
    whole = train(_cfg(tmp_path / "a", **kw))
    train(_cfg(tmp_path / "b", steps=1, **kw))
    torch.rand(7)  # the global generator's state is not what decides the masks
    train(_cfg(tmp_path / "b", resume=True, **kw))
    train(_cfg(tmp_path / "c", **(kw | dict(lora_dropout=0.0))))
    assert all(m["grad_norm"] > 0 for m in whole)
    (wa, sa), (wb, sb) = _adapter_and_optimizer(tmp_path / "a"), _adapter_and_optimizer(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for i in sa:
        assert all(torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for k in sa[i])
    wc, _ = _adapter_and_optimizer(tmp_path / "c")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if "lora_B" in k)  # the dropout did act


def test_seeded_dropout_masks_follow_the_seed_and_leave_the_global_generator(tmp_path):
    run, batch = _dropout_run(tmp_path)

    def two_forwards(seed):
        run.scorer.seed_dropout(seed)
        return [run.scorer(batch, 1.0).detach() for _ in range(2)]

    state = torch.get_rng_state()
    first, again, other = two_forwards(11), two_forwards(11), two_forwards(12)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[0], other[0])


def test_checkpoint_loads_in_peft_and_transformers(tmp_path, length_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg(tmp_path / "run", steps=1, data=length_data, reward="test_length", lr=1e-2, save_merged=True)
    train(cfg)
    ckpt = find_checkpoint(cfg.out)
    base = AutoModelForCausalLM.from_pretrained(ckpt / "base").eval()
    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = peft.PeftModel.from_pretrained(base, ckpt / "adapter").eval()
        peft_logits = adapted(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(ckpt / "merged").eval()(ids).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-5)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4)  # the step trained the adapter
    text = "<python>print(67 * 64)</python>"
    for part in ("adapter", "merged"):
        assert AutoTokenizer.from_pretrained(ckpt / part).encode(text) == demo_tokenizer().encode(text)


def test_resume_refuses_a_checkpoint_of_the_other_kind_and_changes_nothing(tmp_path):
    train(_cfg(tmp_path / "lora", steps=1))
    metrics = (tmp_path / "lora" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="--lora-rank 0: the checkpoint .* holds a LoRA adapter"):
        train(_cfg(tmp_path / "lora", resume=True, lora_rank=0))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: r is 4, the model's adapters have 8"):
        train(_cfg(tmp_path / "lora", resume=True, lora_rank=8))
    assert (tmp_path / "lora" / "metrics.jsonl").read_text() == metrics
    train(_cfg(tmp_path / "full", steps=1, lora_rank=0))
    with pytest.raises(ValueError, match="--lora-rank 4: the checkpoint .* holds a full model"):
        train(_cfg(tmp_path / "full", resume=True))


def test_gradients_reach_the_adapters_under_checkpointing_and_dropout(tmp_path, length_data):
    cfg = _cfg(
        tmp_path / "run",
        steps=1,
        data=length_data,
        reward="test_length",
        gradient_checkpointing="true",
        lora_dropout=0.2,
        packed_update=False,
    )
    (row,) = train(cfg)
    assert row["grad_norm"] > 0
