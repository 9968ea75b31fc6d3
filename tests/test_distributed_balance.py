"""Under torchrun (gloo) every rank trains, even with fewer prompts in a mini-batch than ranks: each
mini-batch's trajectories are spread over all ranks by tokens, and the weights are still those of
one process; the rollout copy is refreshed once a step."""

import pytest
from test_distributed import SCRIPT, STEPS, _ok, _rows, _run, _same_weights, _weights

# one prompt per mini-batch: with 2 or 4 ranks, the one rank holding a prompt's tree would train
# alone while the others ran stand-ins
ONE_PROMPT = ["--steps", "1", "--mini-batch-prompts", "1", "--eval-data", "none"]


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    root = tmp_path_factory.mktemp("spread")
    script = root / "train_by_length.py"
    script.write_text(SCRIPT)
    for procs, name in [(0, "one"), (2, "two"), (4, "four")]:
        _ok(_run(procs, STEPS + ONE_PROMPT + ["--out", str(root / name)], (str(script),)))
    return root


@pytest.mark.parametrize("name", ["two", "four"])
def test_every_rank_trains_and_the_weights_are_one_process(spread, name):
    (one,), (many,) = _rows(spread / "one"), _rows(spread / name)
    assert many["optimizer_steps"] == one["optimizer_steps"] == 4
    assert many["tokens"] == one["tokens"]  # every copy of every model-written token, once
    assert many["update_idle_ranks"] == 0  # each mini-batch's one tree was split over every rank
    assert 1.0 <= many["update_balance"] < 1.5
    assert many["update_exchange_mb"] > 0
    assert many["weight_refreshes"] == 1  # after the last of the 4 optimizer steps only
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert many["kl"] == pytest.approx(one["kl"], rel=1e-4, abs=1e-7)
    _same_weights(_weights(spread / "one"), _weights(spread / name))
