"""The engine on a LoRA policy (arpo_fast/engine/lora.py): logits and sampled tokens against the PEFT
model's own forward, in-place adapter updates seen by the next step, adapters it cannot apply refused
(tiny random models, CPU; the CUDA-graph check needs a GPU)."""

import copy

import pytest
import torch
from helpers import ARCHS, hf_logits, max_rel_err, pytorch_kernels, rel_err, tiny_lora_model, tiny_model

from arpo_fast.engine import Engine, SamplingParams
from arpo_fast.kernels import sample_ref
from arpo_fast.train.lora import LoraSettings, adapter_parameters, add_lora

peft = pytest.importorskip("peft")
PROMPTS = [
    [1, 5, 9, 200, 17, 3, 3, 41, 7, 250, 11, 12, 13, 14, 15, 16, 99, 98, 97],
    [1, 77],
    [299, 0, 150, 151, 152, 30, 31, 32, 33, 34, 35, 36, 37],
]


def _engine_logits(model, prompts, **kw):
    engine = Engine(model, block_size=4, num_blocks=64, **kw)
    return engine.logits([engine.add(p) for p in prompts], all_positions=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_the_peft_forward(arch):
    """One ragged prefill step through the (interpreted) Triton kernels, adapters on every
    projection: the engine's logits are the PEFT model's, and the adapters matter."""
    model = tiny_lora_model(arch)
    base = tiny_model(arch)
    for p, logits in zip(PROMPTS, _engine_logits(model, PROMPTS)):
        assert max_rel_err(logits, hf_logits(model, p)) <= 1e-4
        assert max_rel_err(logits, hf_logits(base, p)) > 0.05


def test_some_targets_and_a_peft_model_wrapper():
    """Adapters on a subset of projections; the engine unwraps a PeftModel."""
    base = tiny_model("qwen2")
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "up_proj"], task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    with pytorch_kernels():
        logits = _engine_logits(wrapped, PROMPTS[:2])
    for p, x in zip(PROMPTS, logits):
        assert max_rel_err(x, hf_logits(wrapped, p)) <= 1e-4


def test_bf16_base_with_fp32_adapters_within_the_tolerance_rule():
    """The GPU setting on the CPU: the engine's error against a float64 run of the same model is at
    most 2x that of the PEFT forward in bf16 (plus a floor for ulp-level noise)."""
    model = tiny_lora_model("llama", dtype=torch.bfloat16)
    exact = tiny_lora_model("llama", dtype=torch.bfloat16).double()  # the same bf16 values, in float64
    with pytorch_kernels():
        ours = _engine_logits(model, PROMPTS)
    for p, x in zip(PROMPTS, ours):
        e = hf_logits(exact, p).double()
        assert rel_err(x, e) <= 2 * rel_err(hf_logits(model, p), e) + 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_tokens_equal_the_reference_sampler_on_peft_logits(arch):
    """Tokens sampled by the engine (temperature 1, per-sequence seeds) are the reference sampler's
    draws on the PEFT model's logits at the same (seed, position), token by token."""
    model = tiny_lora_model(arch)
    seeds = [11, 12, 13]
    with pytorch_kernels():
        outs = Engine(model, num_blocks=64).generate(
            PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True), seeds=seeds
        )
    for p, seed, out in zip(PROMPTS, seeds, outs):
        full = p + out.token_ids
        logits = hf_logits(model, full[:-1])[len(p) - 1 :]
        n = len(out.token_ids)
        ref = sample_ref(logits, 1.0, torch.full((n,), seed), torch.arange(len(p), len(full)))
        assert out.token_ids == ref.tokens.tolist()
        torch.testing.assert_close(torch.tensor(out.logprobs), ref.logprobs, rtol=1e-4, atol=1e-5)


def test_sampled_tokens_equal_the_merged_model_in_the_engine(tmp_path):
    from transformers import AutoModelForCausalLM

    from arpo_fast.train.lora_files import save_merged

    model = tiny_lora_model("qwen3")
    save_merged(model, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    with pytorch_kernels():
        ours = Engine(model, num_blocks=64).generate(PROMPTS, params, seeds=[4, 5, 6])
        theirs = Engine(merged, num_blocks=64).generate(PROMPTS, params, seeds=[4, 5, 6])
    assert [o.token_ids for o in ours] == [t.token_ids for t in theirs]


def test_an_optimizer_step_on_the_adapters_is_seen_by_the_next_engine_step():
    model = tiny_lora_model("qwen2")
    engine = Engine(model, num_blocks=64)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytorch_kernels():
        before = engine.logits([engine.add(PROMPTS[0])])[0]
    opt = torch.optim.AdamW([p for _, p in adapter_parameters(model)], lr=0.05)
    ids = torch.tensor([PROMPTS[0]])
    model(ids, labels=ids).loss.backward()
    opt.step()
    with pytorch_kernels():
        after = engine.logits([engine.add(PROMPTS[0])])[0]
    assert max_rel_err(after, hf_logits(model, PROMPTS[0])[-1]) <= 1e-4
    assert (after - before).abs().max() > 0.1
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}


def test_the_engine_runs_without_dropout_in_training_mode():
    model = tiny_lora_model("llama", dropout=0.5)
    expected = hf_logits(model, PROMPTS[0])  # eval mode: no dropout
    model.train()
    with pytorch_kernels():
        (ours,) = _engine_logits(model, PROMPTS[:1])
    assert max_rel_err(ours, expected) <= 1e-4


def _peft_model(**config):
    model = peft.get_peft_model(tiny_model("qwen2"), peft.LoraConfig(r=2, task_type="CAUSAL_LM", **config))
    return model.get_base_model()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _peft_model(target_modules=["q_proj", "lm_head"]), "LoRA adapter on lm_head: the engine"),
        (lambda: _peft_model(target_modules=["v_proj"], use_dora=True), "layer 0 v_proj: LoRA variant"),
        (lambda: _merged(), "layer 0 q_proj: the LoRA adapter is merged"),
    ],
)
def test_adapters_the_engine_cannot_apply_are_refused(make, message):
    with pytest.raises(ValueError, match=message) as info:
        Engine(make(), num_blocks=8)
    assert "\n" not in str(info.value)


def _merged():
    model = tiny_model("qwen2")
    add_lora(model, LoraSettings(2, targets="q_proj"))
    model.model.layers[0].self_attn.q_proj.merge()
    return model


def _decode_once(engine, seeds):
    """Fresh sequences of PROMPTS: a prefill step, then one decode step (on CUDA, a graph replay).
    Returns their tokens before the decode step (pending token included) and its output."""
    seqs = [engine.add(p, seed=s) for p, s in zip(PROMPTS, seeds)]
    engine.step(seqs)
    tokens = [engine.tokens(s) for s in seqs]
    out = engine.step(seqs)
    for s in seqs:
        engine.free(s)
    return tokens, out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 0.15)])
def test_gpu_cuda_graphs_see_in_place_adapter_updates(dtype, tol):
    """Decode steps replayed from CUDA graphs captured before the adapters move: after an in-place
    update, a new sequence's replayed step has the log-probs of the updated PEFT model, not of the
    old one (which differs by several nats). In bf16 both sides round logits of a few units to
    bf16, a few hundredths each, hence the wider tolerance."""
    model = tiny_lora_model("qwen3", dtype=dtype).cuda()
    engine = Engine(model, block_size=16, num_blocks=64, max_graph_batch=8, max_seq_len=256)
    _decode_once(engine, [0, 1, 2])  # captures the graphs
    assert engine.runner.graphs is not None and engine.runner.graphs.replays > 0
    old_model = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
    replays = engine.runner.graphs.replays
    tokens, out = _decode_once(engine, [0, 1, 2])
    assert engine.runner.graphs.replays == replays + 1
    stale = []
    for i, t in enumerate(tokens):
        token = int(out.tokens[i])
        new = hf_logits(model, t).log_softmax(-1)[-1, token]
        assert abs(float(out.logprobs[i]) - float(new)) <= tol
        stale.append(abs(float(out.logprobs[i]) - float(hf_logits(old_model, t).log_softmax(-1)[-1, token])))
    assert max(stale) > 0.5  # the old adapters would have given other log-probs
