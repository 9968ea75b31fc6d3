"""The ratio's old policy (``--old-logprobs``): the trainer's recomputed log-probs, or the sampler's
stored with the rollout, which skips the forward pass over the later mini-batches."""

import pytest
import torch

from arpo_fast.rollout.responses import Response, assemble_tree
from arpo_fast.train import update as update_module
from arpo_fast.train.cli import parse_config
from arpo_fast.train.demo import demo_model
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.padded import pack, token_logprobs
from arpo_fast.train.update import UpdateConfig, UpdateData, update


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _responses(tok):
    """Two prompts (two mini-batches of one prompt each), two answers each."""
    prompt = tok.encode("Problem: what is 2 + 2?\n")
    good, bad = tok.encode("<answer>\\boxed{4}</answer>"), tok.encode("<answer>\\boxed{5}</answer>")
    return [
        Response(p, prompt, response_ids=ids, loss_mask=[1] * len(ids)) for p in (0, 1) for ids in (good, bad)
    ]


def _tree(model, tok, shift: float):
    """The rollout record with sampler log-probs ``shift`` below the model's own."""
    responses = _responses(tok)
    trajs = assemble_tree(responses).trajectories
    with torch.no_grad():
        lp = token_logprobs(model, pack(trajs, list(range(len(trajs))), tok.pad_token_id, "cpu"), 1.0)[0]
    for r, values in zip(responses, lp.split([len(t.response_ids) for t in trajs])):
        r.logprobs = [v - shift for v in values.tolist()]
    return assemble_tree(responses)


def _run(tok, mode: str, packed: bool, shift: float = 0.0, lr: float = 0.05):
    """One update over two mini-batches; returns (metrics, decoder forwards, old log-probs the loss
    saw per micro-batch, rollout log-probs of those micro-batches)."""
    model = demo_model(tok, seed=1).eval()
    tree = _tree(model, tok, shift)
    adv = [torch.full((len(t.response_ids),), a) for t, a in zip(tree.trajectories, (1.0, -1.0, 1.0, -1.0))]
    forwards = []
    model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    seen = []
    original = update_module._Update.loss

    def spy(self, batch, logprobs, old_lp, entropy, ref_lp, done):
        seen.append((old_lp.detach().clone(), batch.rollout_logprobs.clone(), logprobs.detach().clone()))
        return original(self, batch, logprobs, old_lp, entropy, ref_lp, done)

    update_module._Update.loss = spy
    try:
        optimizer = MasterWeights(model.parameters(), lambda ps: torch.optim.SGD(ps, lr=lr))
        cfg = UpdateConfig(mini_batch_prompts=1, old_logprobs=mode, packed_update=packed, grad_clip=0.0)
        metrics = update(model, optimizer, UpdateData(tree, adv, tok.pad_token_id), cfg)
    finally:
        update_module._Update.loss = original
    return metrics, len(forwards), seen


@pytest.mark.parametrize("packed", [True, False])
def test_rollout_old_logprobs_run_no_extra_forward(tok, packed):
    """Two mini-batches of one micro-batch each: recompute runs the second one twice (its old
    log-probs before the first optimizer step, then its training forward), rollout once."""
    recompute, recompute_forwards, _ = _run(tok, "recompute", packed)
    rollout, rollout_forwards, _ = _run(tok, "rollout", packed)
    assert recompute_forwards == 3 and rollout_forwards == 2
    assert rollout["forward_tokens"] < recompute["forward_tokens"]
    assert rollout["optimizer_steps"] == recompute["optimizer_steps"] == 2


@pytest.mark.parametrize("packed", [True, False])
def test_the_ratio_is_against_the_rollout_log_probs(tok, packed):
    """Sampler log-probs 0.5 below the trainer's: with rollout the first mini-batch's ratio is
    exp(0.5), beyond the clip, so every positive-advantage token is clipped; with recompute the
    first mini-batch's ratio is 1 (the trainer's own log-probs) and nothing is."""
    rollout, _, seen = _run(tok, "rollout", packed, shift=0.5, lr=0.0)
    for old, sampled, _ in seen:
        torch.testing.assert_close(old, sampled)
    assert rollout["clip_fraction"] > 0.4
    assert rollout["logprob_mismatch_mean"] == pytest.approx(0.5, abs=1e-4)  # the first mini-batch's
    recompute, _, seen = _run(tok, "recompute", packed, shift=0.5, lr=0.0)
    first_old, _, first_new = seen[0]
    torch.testing.assert_close(first_old, first_new)
    assert recompute["clip_fraction"] == 0.0
    assert recompute["logprob_mismatch_mean"] == pytest.approx(0.5, abs=1e-4)


def test_recompute_is_unchanged_by_the_setting(tok):
    """The default is the trainer's recomputation: the same update as before the setting existed
    (a later mini-batch's old log-probs are the policy before the first step, not the moved one)."""
    metrics, _, seen = _run(tok, "recompute", True, shift=0.5, lr=0.5)
    (old0, _, new0), (old1, _, new1) = seen
    torch.testing.assert_close(old0, new0)
    assert not torch.allclose(old1, new1)  # the policy moved after the first optimizer step
    assert UpdateConfig().old_logprobs == "recompute"


def test_an_unknown_mode_and_a_cap_with_rollout_are_one_line_errors():
    with pytest.raises(ValueError, match="old_logprobs must be recompute or rollout"):
        UpdateConfig(old_logprobs="sampler")
    with pytest.raises(ValueError, match="rollout_is_cap"):
        UpdateConfig(old_logprobs="rollout", rollout_is_cap=2.0)
    assert parse_config(["--old-logprobs", "rollout", "--out", "x"]).update.old_logprobs == "rollout"
