"""The Hugging Face internals the trainer relies on (``arpo_fast/train/hf_adapter.py``), probed on the
installed transformers with tiny Llama, Qwen2 and Qwen3 models: a version that changes one of them
fails here, naming it, before a training run computes something else than it should."""

import pytest
import torch
import transformers
from helpers import ARCHS, tiny_model

from arpo_fast.train import hf_adapter
from arpo_fast.train.attention import key_bounds, tree_block_mask

WHERE = (
    f"transformers {transformers.__version__} changed what arpo_fast/train/hf_adapter.py relies on "
    f"(checked against {', '.join(hf_adapter.CHECKED_TRANSFORMERS)})"
)


class _Recorder:
    """An attention function that records how it is called and computes plain causal attention."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        self.calls.append(
            dict(layer=module.layer_idx, q=query.shape, k=key.shape, mask=attention_mask, kwargs=kwargs)
        )
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("arch", ARCHS)
def test_a_registered_attention_function_is_called_as_the_adapter_says(arch):
    model = tiny_model(arch).eval()
    ids = torch.randint(3, 300, (1, 11))
    positions = torch.arange(11)[None]
    recorder = _Recorder()
    before = model.config._attn_implementation
    with torch.no_grad():
        want = hf_adapter.hidden_states(model, input_ids=ids, position_ids=positions)
        with hf_adapter.attention_function(model, "arpo_probe", recorder):
            got = hf_adapter.hidden_states(model, input_ids=ids, position_ids=positions, tree_probe="passed")
    layers = len(hf_adapter.decoder_layers(model))
    assert [c["layer"] for c in recorder.calls] == list(range(layers)), f"{WHERE}: module.layer_idx"
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for call in recorder.calls:
        assert tuple(call["q"]) == (1, cfg.num_attention_heads, 11, head_dim), f"{WHERE}: query layout"
        assert tuple(call["k"]) == (1, cfg.num_key_value_heads, 11, head_dim), f"{WHERE}: key layout"
        assert call["kwargs"].get("tree_probe") == "passed", f"{WHERE}: extra keyword arguments"
    torch.testing.assert_close(got, want, msg=f"{WHERE}: the attention output's layout [1, T, H, D]")
    assert model.config._attn_implementation == before


def test_a_block_mask_reaches_the_attention_function_untouched():
    model = tiny_model("qwen2").eval()
    end = torch.full((9,), 9)
    mask = tree_block_mask(*key_bounds(end), 9)
    recorder = _Recorder()
    with torch.no_grad(), hf_adapter.attention_function(model, "arpo_probe", recorder):
        hf_adapter.hidden_states(model, input_ids=torch.randint(3, 300, (1, 9)), attention_mask=mask)
    assert recorder.calls and all(c["mask"] is mask for c in recorder.calls), f"{WHERE}: attention_mask"


def test_a_layer_forward_set_on_the_instance_is_the_one_called():
    model = tiny_model("llama").eval()
    calls = []

    def counted(forward):
        def run(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        return run

    with torch.no_grad():
        want = hf_adapter.hidden_states(model, input_ids=torch.arange(3, 10)[None])
        with hf_adapter.wrapped_layers(model, counted):
            got = hf_adapter.hidden_states(model, input_ids=torch.arange(3, 10)[None])
    assert len(calls) == len(hf_adapter.decoder_layers(model)), f"{WHERE}: decoder layers' forward"
    torch.testing.assert_close(got, want)
    assert all("forward" not in vars(layer) for layer in hf_adapter.decoder_layers(model))


def test_sliding_window_layers_are_named_in_the_config():
    assert not hf_adapter.sliding_window_layers(tiny_model("qwen2"))
    sliding = tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert hf_adapter.sliding_window_layers(sliding), f"{WHERE}: config.layer_types"


def test_the_lm_head_weight_gives_the_models_logits():
    model = tiny_model("qwen3").eval()
    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        hidden = hf_adapter.hidden_states(model, input_ids=ids)
        logits = model(ids).logits
    torch.testing.assert_close(hidden @ hf_adapter.lm_head_weight(model).T, logits, msg=f"{WHERE}: lm_head")
