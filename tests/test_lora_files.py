"""A LoRA policy on disk (arpo_fast/train/lora_files.py): the adapter loads in PEFT, the merged model
in transformers, the live model is left alone, and bad folders are one-line errors that change
nothing (tiny random models, CPU)."""

import json

import pytest
import torch
from helpers import hf_logits, max_rel_err, tiny_lora_model, tiny_model

from arpo_fast.train.lora import adapter_parameters
from arpo_fast.train.lora_files import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter, save_merged

peft = pytest.importorskip("peft")
IDS = [1, 5, 9, 200, 17, 3, 41, 7, 250, 11]


def _moved(model):
    """``model`` with every adapter tensor moved off its value (loading must put it back)."""
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _snapshot(model):
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in model.state_dict(keep_vars=True).items()}


def _unchanged(model, snapshot) -> bool:
    now = model.state_dict(keep_vars=True)
    return now.keys() == snapshot.keys() and all(
        now[n].data_ptr() == ptr and torch.equal(now[n].detach(), t) for n, (ptr, t) in snapshot.items()
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # tied and untied embeddings
def test_saved_adapter_loads_with_peft(tmp_path, arch):
    model = tiny_lora_model(arch, targets="q_proj,v_proj,down_proj")
    before = _snapshot(model)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert _unchanged(model, before)
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter")
    ours = dict(adapter_parameters(model))
    theirs = dict(adapter_parameters(loaded.get_base_model()))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert torch.equal(hf_logits(loaded, IDS), hf_logits(model, IDS))


def test_load_adapter_copies_in_place(tmp_path):
    model = tiny_lora_model("qwen3")
    save_adapter(model, tmp_path / "a")
    other = _moved(tiny_lora_model("qwen3"))
    ptrs = {n: p.data_ptr() for n, p in adapter_parameters(other)}
    assert not torch.equal(hf_logits(other, IDS), hf_logits(model, IDS))
    load_adapter(other, tmp_path / "a")
    assert ptrs == {n: p.data_ptr() for n, p in adapter_parameters(other)}  # engines keep working
    assert torch.equal(hf_logits(other, IDS), hf_logits(model, IDS))


def test_load_adapter_from_peft_save_pretrained(tmp_path):
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base, config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = _moved(tiny_lora_model("llama", targets="v_proj,q_proj"))
    load_adapter(ours, tmp_path / "peft")
    assert torch.equal(hf_logits(ours, IDS), hf_logits(theirs, IDS))


def _corrupt(folder, name, text):
    (folder / name).write_bytes(text)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / WEIGHTS_FILE).unlink(), f"{WEIGHTS_FILE}: missing"),
        (lambda d: _corrupt(d, CONFIG_FILE, b"{not json"), f"{CONFIG_FILE}: not readable JSON"),
        (lambda d: _corrupt(d, WEIGHTS_FILE, b"\x00" * 64), f"{WEIGHTS_FILE}: cannot read it"),
        (lambda d: _edit_config(d, r=8), f"{CONFIG_FILE}: r is 8, the model's adapters have 4"),
        (lambda d: _edit_config(d, target_modules=["q_proj"]), f"{CONFIG_FILE}: target_modules is"),
        (lambda d: _drop_tensor(d), f"{WEIGHTS_FILE}: missing base_model.model.model.layers"),
    ],
)
def test_bad_adapter_folders_are_one_line_errors_and_change_nothing(tmp_path, damage, message):
    save_adapter(tiny_lora_model("qwen2"), tmp_path)
    damage(tmp_path)
    model = _moved(tiny_lora_model("qwen2"))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message) as info:
        load_adapter(model, tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert _unchanged(model, before)


def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _drop_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_FILE)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, folder / WEIGHTS_FILE)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_merged_model_loads_in_transformers_and_equals_the_adapted_one(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_lora_model(arch)
    before = _snapshot(model)
    config = model.config.to_dict()
    save_merged(model, tmp_path / "merged")
    assert _unchanged(model, before)
    assert model.config.to_dict() == config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged) is type(model) and not hasattr(merged, "peft_config")
    assert max_rel_err(hf_logits(merged, IDS), hf_logits(model, IDS)) <= 1e-5


def test_merged_model_keeps_a_bf16_base_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_lora_model("qwen2", dtype=torch.bfloat16)
    save_merged(model, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    q = model.model.layers[1].self_attn.q_proj
    expected = q.base_layer.weight.float() + q.lora_B["default"].weight @ q.lora_A["default"].weight * 2
    assert torch.equal(merged.model.layers[1].self_attn.q_proj.weight, expected.to(torch.bfloat16))


def test_saving_never_writes_into_a_folder_with_files(tmp_path):
    model = tiny_lora_model("qwen2")
    (tmp_path / "notes.txt").write_text("mine")
    for save in (save_adapter, save_merged):
        with pytest.raises(ValueError, match="exists and is not an empty folder; nothing written"):
            save(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(tiny_model("qwen2"), tmp_path / "new")
