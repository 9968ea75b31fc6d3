"""LoRA policies (arpo_fast/train/lora.py): settings, what trains and in which dtype, the base model
as KL reference without a copy, and dropout (tiny random models, CPU)."""

import pytest
import torch
from helpers import hf_logits, tiny_lora_model, tiny_model

from arpo_fast.engine.lora import PROJECTIONS
from arpo_fast.train.lora import (
    LoraSettings,
    adapter_dropout,
    adapter_parameters,
    adapters_disabled,
    add_lora,
    lora_layers,
)

pytest.importorskip("peft")
IDS = [1, 5, 9, 200, 17, 3, 41, 7, 250, 11]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be an int >= 1"),
        ({"rank": True}, "rank must be an int >= 1"),
        ({"rank": 4, "alpha": 0}, "alpha must be > 0"),
        ({"rank": 4, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"rank": 4, "targets": "q_proj,lm_head"}, "lora targets: lm_head; expected some of q_proj"),
        ({"rank": 4, "targets": ()}, "lora targets: none given"),
        ({"rank": 4, "targets": ["v_proj", "v_proj"]}, "names a projection twice"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        LoraSettings(**kwargs)
    assert "\n" not in str(info.value)


def test_settings_defaults_and_targets_from_a_string():
    s = LoraSettings(16)
    assert s.targets == PROJECTIONS and s.scale == 1.0 and s.dropout == 0.0
    assert LoraSettings(8, alpha=32).scale == 4.0
    assert LoraSettings(8, targets=" q_proj, v_proj").targets == ("q_proj", "v_proj")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_add_lora_freezes_the_base_and_starts_as_the_base_model(arch):
    model = tiny_model(arch)
    before = hf_logits(model, IDS)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert add_lora(model, LoraSettings(4, 8), seed=0) is model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapters = adapter_parameters(model)
    assert sorted(trainable) == sorted(n for n, _ in adapters)
    assert len(adapters) == 2 * len(PROJECTIONS) * model.config.num_hidden_layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # B is zero: the policy starts as the base model, whose weights are untouched
    assert torch.equal(hf_logits(model, IDS), before)
    weights = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(weights[n], t) for n, t in base.items())


def test_adapters_are_fp32_on_a_bf16_base_and_seeded():
    model = tiny_model("qwen2").to(torch.bfloat16)
    add_lora(model, LoraSettings(4, targets="q_proj,down_proj"), seed=7)
    assert {p.dtype for _, p in adapter_parameters(model)} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)} == {"q_proj", "down_proj"}
    again = add_lora(
        tiny_model("qwen2").to(torch.bfloat16), LoraSettings(4, targets="q_proj,down_proj"), seed=7
    )
    for (_, a), (_, b) in zip(adapter_parameters(model), adapter_parameters(again)):
        assert torch.equal(a, b)
    ids = torch.tensor([IDS])
    model(ids, labels=ids).loss.backward()  # bf16 base, fp32 adapters: gradients reach A and B
    grads = [p.grad for _, p in adapter_parameters(model)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_add_lora_errors():
    model = tiny_lora_model("qwen2")
    with pytest.raises(ValueError, match="already has adapters"):
        add_lora(model, LoraSettings(4))
    with pytest.raises(ValueError, match="lora targets: the model has no q_proj layers"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraSettings(4, targets="q_proj"))


def test_adapters_disabled_is_the_base_model_without_a_copy():
    base = tiny_model("qwen3")
    model = tiny_lora_model("qwen3")
    expected_base, adapted = hf_logits(base, IDS), hf_logits(model, IDS)
    assert (adapted - expected_base).abs().max() > 0.1  # the adapters matter
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with adapters_disabled(model):
        assert torch.equal(hf_logits(model, IDS), expected_base)
        with adapters_disabled(model):  # nests
            assert torch.equal(hf_logits(model, IDS), expected_base)
        assert torch.equal(hf_logits(model, IDS), expected_base)
    assert torch.equal(hf_logits(model, IDS), adapted)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(hf_logits(model, IDS), adapted)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}


def test_gradients_flow_to_the_adapters_only():
    model = tiny_lora_model("llama")
    ids = torch.tensor([IDS])
    with adapters_disabled(model), torch.no_grad():
        reference = model(ids).logits.log_softmax(-1)
    logprobs = model(ids).logits.log_softmax(-1)
    (logprobs - reference).exp().sum().backward()  # a KL-like term against the reference
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name


def test_adapter_dropout_acts_inside_the_block_only():
    model = tiny_lora_model("qwen2", dropout=0.5)
    assert not model.training
    plain = hf_logits(model, IDS)
    assert torch.equal(hf_logits(model, IDS), plain)  # eval mode: no dropout
    with adapter_dropout(model):
        dropped = hf_logits(model, IDS)
    assert (dropped - plain).abs().max() > 1e-3
    assert torch.equal(hf_logits(model, IDS), plain)
    assert not any(m.training for m in model.modules())
