"""The memory plan's formulas against the models they describe: parameter counts, the activation
bytes autograd really saves, the KV bytes the engine's pool holds a token, and the plan's verdicts
for the sizes the docs quote."""

import pytest
import torch

from arpo_fast.engine.random_model import random_causal_lm
from arpo_fast.train.memory import GIB, ModelShape, PlanSettings, format_plan, plan_memory

# Shapes unlike the ones the formula was first counted on (odd widths, GQA ratios, head_dim set).
SHAPES = [
    ("qwen2", dict(hidden=120, heads=5, kv_heads=1, intermediate=232)),
    ("llama", dict(hidden=96, heads=6, kv_heads=3, intermediate=136)),
    ("llama", dict(hidden=64, heads=4, kv_heads=4, intermediate=176, tie_word_embeddings=True)),
    ("qwen3", dict(hidden=72, heads=6, kv_heads=2, intermediate=152, head_dim=20)),
]


def _model(arch, layers, **kw):
    kw = dict(kw)
    return random_causal_lm(arch, vocab=131, layers=layers, dtype=torch.bfloat16, **kw)


def _saved_bytes_per_token(model, tokens=29) -> float:
    """Bytes of every tensor autograd saves in one forward of the decoder, parameters excepted."""
    for p in model.parameters():
        p.requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 131, (1, tokens)), use_cache=False)
    return sum(seen.values()) / tokens


@pytest.mark.parametrize("arch,kw", SHAPES)
def test_parameter_counts_are_exact(arch, kw):
    model = _model(arch, 2, **kw)
    shape = ModelShape.from_config(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,kw", SHAPES)
def test_activation_bytes_per_layer_are_what_autograd_saves(arch, kw):
    """The per-layer figure is the difference a third layer makes, to within 1%."""
    two, three = (_saved_bytes_per_token(_model(arch, n, **kw)) for n in (2, 3))
    shape = ModelShape.from_config(_model(arch, 1, **kw).config)
    assert abs(shape.layer_activation_bytes() - (three - two)) <= 0.01 * (three - two)
    outside = two - 2 * (three - two)  # embedding and final norm: the plan allows 10 H
    assert 0 < outside <= 10 * shape.hidden


def test_kv_bytes_per_token_match_the_engines_pool():
    from arpo_fast.engine.kv_cache import PagedKVCache

    model = random_causal_lm("qwen3", vocab=131, hidden=64, layers=3, heads=4, kv_heads=2, head_dim=24)
    shape = ModelShape.from_config(model.config)
    block = PagedKVCache.bytes_per_block(3, 16, 2, 24, torch.bfloat16)
    assert block == 16 * shape.kv_bytes_per_token()


def test_lora_parameters_count_every_targeted_projection():
    shape = ModelShape.from_config(_model("qwen2", 2, hidden=64, heads=4, kv_heads=2, intermediate=96).config)
    # per layer: q 64->64, k,v 64->32, o 64->64, gate/up 64->96, down 96->64; r (in + out) each
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 96) + (96 + 64))
    assert shape.lora_params(8) == 2 * per_layer
    assert shape.lora_params(8, ("q_proj", "v_proj")) == 2 * 8 * ((64 + 64) + (64 + 32))


QWEN3_14B = ModelShape(
    vocab=151936,
    hidden=5120,
    layers=40,
    heads=40,
    kv_heads=8,
    head_dim=128,
    intermediate=17408,
    tied=False,
    qk_norm=True,
)
QWEN25_7B = ModelShape(
    vocab=152064,
    hidden=3584,
    layers=28,
    heads=28,
    kv_heads=4,
    head_dim=128,
    intermediate=18944,
    tied=False,
    qkv_bias=True,
)
QWEN25_32B = ModelShape(
    vocab=152064,
    hidden=5120,
    layers=64,
    heads=40,
    kv_heads=8,
    head_dim=128,
    intermediate=27648,
    tied=False,
    qkv_bias=True,
)


def test_qwen3_14b_on_eight_80gb_gpus_leaves_20_gib_for_kv_and_activations():
    plan = plan_memory(QWEN3_14B, PlanSettings(world=8, gpu_gib=79.6))
    assert plan.fits
    assert plan.kv_pool_gib >= 20
    activations = next(row[2] for row in plan.rows if row[0] == "activations")
    assert activations + plan.update_free_gib >= 20


def test_one_80gb_gpu_needs_lora_for_7b_and_14b():
    full = plan_memory(QWEN25_7B, PlanSettings(world=1, gpu_gib=79.6))
    assert not full.fits  # 18 B a parameter: 128 GiB
    for shape in (QWEN25_7B, QWEN3_14B):
        lora = plan_memory(shape, PlanSettings(world=1, gpu_gib=79.6, lora_rank=16))
        assert lora.fits and lora.kv_pool_gib >= 20


def test_offloading_the_optimizer_gives_its_memory_to_the_kv_pool():
    settings = PlanSettings(world=8, gpu_gib=140.4)
    kept = plan_memory(QWEN25_32B, settings)
    moved = plan_memory(QWEN25_32B, PlanSettings(world=8, gpu_gib=140.4, offload_optimizer=True))
    expected = 12 * QWEN25_32B.params / 8 / GIB
    assert moved.kv_pool_gib - kept.kv_pool_gib == pytest.approx(expected)
    assert moved.update_free_gib == pytest.approx(kept.update_free_gib)
    assert moved.fits


def test_the_printed_plan_names_every_row_and_its_verdict():
    text = format_plan(plan_memory(QWEN3_14B, PlanSettings(world=8, gpu_gib=79.6)))
    for what in ("engine's weights", "fp32 master weights", "AdamW state", "activations", "KV pool", "free"):
        assert what in text
    assert text.splitlines()[-1].startswith("fits: KV pool")
    text = format_plan(plan_memory(QWEN25_7B, PlanSettings(world=1, gpu_gib=79.6)))
    assert text.splitlines()[-1].startswith("does NOT fit")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch,kw", SHAPES[:1] + SHAPES[3:])
def test_lora_activation_bytes_are_what_autograd_saves(arch, kw, dropout):
    """What adapters (peft, fp32) add to a layer's saved tensors, to within 1%."""
    from arpo_fast.train.lora import LoraSettings, add_lora

    peft = pytest.importorskip("peft")
    assert peft
    rank, targets = 8, ("q_proj", "v_proj", "o_proj", "down_proj")

    def per_layer(lora: bool) -> float:
        two, three = [], []
        for n, out in ((2, two), (3, three)):
            model = _model(arch, n, **kw)
            if lora:
                add_lora(model, LoraSettings(rank, dropout=dropout, targets=targets), seed=0)
                model.train()  # dropout acts, as in the update's gradient forwards
            out.append(_saved_bytes_per_token(model))
        return three[0] - two[0]

    shape = ModelShape.from_config(_model(arch, 1, **kw).config)
    counted = per_layer(True) - per_layer(False)
    want = shape.lora_activation_bytes(rank, targets, 4 if dropout else 0)  # the CPU's float mask
    assert abs(want - counted) <= 0.01 * counted


@pytest.mark.parametrize("shape", [QWEN25_7B, QWEN3_14B])
def test_lora_rank_64_on_one_80gb_gpu_counts_the_base_at_2_bytes(shape):
    settings = PlanSettings(world=1, gpu_gib=79.6, lora_rank=64, kl_penalty=True)
    plan = plan_memory(shape, settings)
    rows = {r[0]: r[1:3] for r in plan.rows}
    assert rows["frozen base weights, bf16"] == (2 * shape.params / GIB,) * 2
    adapters = shape.lora_params(64)
    assert rows["LoRA adapters, fp32"] == (4 * adapters / GIB,) * 2
    assert rows["AdamW state, fp32"] == (8 * adapters / GIB,) * 2
    assert rows["gradients, fp32"] == (0, 4 * adapters / GIB)
    assert rows["KL reference"] == (0, 0) and "fp32 master weights" not in rows
    assert plan.fits and plan.kv_pool_gib >= 40
    # under torchrun the base stays whole beside its shards, and the adapters' state is sharded
    two = {r[0]: r[1:3] for r in plan_memory(shape, PlanSettings(world=2, lora_rank=64)).rows}
    assert two["frozen base weights, bf16"] == rows["frozen base weights, bf16"]
    assert two["frozen base shards, bf16"] == (shape.params / GIB,) * 2
    assert two["AdamW state, fp32"] == (4 * adapters / GIB,) * 2
