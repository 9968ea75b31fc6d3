"""Launch configurations of the sampler: chunk size, warps, run length, pipeline stages, a
persistent grid, the fused finish step and grid slicing change no token (and values only at
rounding level); bad configurations are refused; CUDA graphs replay the same results."""

import pytest
import torch
from helpers import assert_close64, random_logits, sampler_batch

from arpo_fast.kernels import sample, sample_ref, sampling
from arpo_fast.kernels.sampling import LaunchConfig, _sample_triton


def test_kernel_token_independent_of_chunk_size():
    """Chunks of 16, 64 and 256 entries over V = 200: the token is the inverse CDF of one uniform
    over the whole row, so it may differ only where the uniform lands within float rounding of a
    token boundary (probability ~1e-6 per row here). Rows: 24, all must agree."""
    B, V = 24, 200
    logits = random_logits(B, V)
    seeds, pos = torch.arange(B) * 31, torch.arange(B)
    tokens = [_sample_triton(logits, 1.0, seeds, pos, config=LaunchConfig(c)).tokens for c in (16, 64, 256)]
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[2])
    assert torch.equal(tokens[0], sample_ref(logits, 1.0, seeds, pos).tokens)


@pytest.mark.parametrize(
    "config",
    [
        LaunchConfig(64, 2, 4, 64, True),
        LaunchConfig(64, 1, 2, 16, False),
        LaunchConfig(128, 4, 1, 128, False),
        LaunchConfig(64, 4, 1, 1, True),
        LaunchConfig(32, 8, 1, 32, True),
        LaunchConfig(32, 2, 1, 16, True, 3),
        LaunchConfig(64, 1, 2, 64, False, 4),
        LaunchConfig(16, 1, 2, 16, True, 4, 2),
        LaunchConfig(32, 2, 1, 8, True, 2, 3),
        LaunchConfig(16, 1, 2, 16, False, stages=2, persistent=3),
        LaunchConfig(32, 4, 1, 32, False, persistent=5),
    ],
    ids=str,
)
def test_launch_configs_give_the_same_samples(config):
    """Under the interpreter the warp count, the chunks per warp, the pipeline stages, a
    persistent grid and fusing the finish step change nothing computed; the run length changes
    sums only at rounding level.
    Same tokens as the reference, masked rows, greedy rows and top-k included (V = 300: a partial
    last chunk, and programs whose last chunks lie past the end)."""
    B, V = 6, 300
    logits = random_logits(B, V)
    logits[1, ::3] = float("-inf")
    temps = torch.tensor([1.0, 0.7, 0.0, 2.0, 1e-3, 1.0])
    seeds, pos = torch.arange(B) * 7, torch.arange(B)
    base = _sample_triton(logits, temps, seeds, pos, config=LaunchConfig(config.chunk, fused=False))
    out = _sample_triton(logits, temps, seeds, pos, config=config)
    assert torch.equal(out.tokens, sample_ref(logits, temps, seeds, pos).tokens)
    assert torch.equal(out.tokens, base.tokens)
    torch.testing.assert_close(out.logprobs, base.logprobs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.entropy, base.entropy, rtol=1e-6, atol=1e-7)
    top = _sample_triton(logits, temps, seeds, pos, top_k=5, config=config)
    assert torch.equal(top.tokens, sample_ref(logits, temps, seeds, pos, top_k=5).tokens)


@pytest.mark.parametrize("warps,persistent", [(1, 3), (2, 1), (4, 5), (8, 2)])
def test_persistent_streaming_pass_writes_the_same_records(warps, persistent):
    """A grid sized to the GPU, with programs crossing rows (and warps past the batch's last
    chunk on its last step), gives the row-grid launch's results bit for bit. V = 300 with chunks
    of 32: 9 full chunks per row and a partial one; with 8 warps per program (more than the full
    chunks of a row at V = 200) the launcher falls back to the row grid."""
    B = 7
    for V in (300, 200):
        logits = random_logits(B, V)
        logits[2, ::5] = float("-inf")
        temps = torch.tensor([1.0, 0.6, 0.0, 1.7, 1e-3, 1.0, 0.9])
        seeds, pos = torch.arange(B) * 3, torch.arange(B)
        rows = LaunchConfig(32, warps, 1, 16, False)
        want = _sample_triton(logits, temps, seeds, pos, top_k=40, config=rows)
        got = _sample_triton(logits, temps, seeds, pos, top_k=40, config=rows._replace(persistent=persistent))
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_fused_finish_leaves_its_row_counters_at_zero():
    """The last program of a row resets the row's arrival counter, so the next call (or a CUDA
    graph replay) starts from zero and gives the same result."""
    B, V = 5, 700
    logits = random_logits(B, V)
    config = LaunchConfig(64, 2)
    first = _sample_triton(logits, 0.8, 9, torch.arange(B), config=config)
    counters = sampling._row_counters(logits.device, B)
    assert int(counters.abs().sum()) == 0
    again = _sample_triton(logits, 0.8, 9, torch.arange(B), config=config)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)


def test_batches_past_the_grid_limit_are_launched_in_slices(monkeypatch):
    """CUDA grids hold at most 65535 rows in their second dimension; larger batches go in slices
    (here the limit is lowered to 4 so the interpreter stays quick)."""
    B, V = 10, 100
    logits = random_logits(B, V)
    temps = torch.linspace(0.0, 2.0, B)
    whole = _sample_triton(logits, temps, 3, torch.arange(B))
    monkeypatch.setattr(sampling, "_MAX_GRID_ROWS", 4)
    for seed in (3, torch.full((B,), 3)):
        sliced = _sample_triton(logits, temps, seed, torch.arange(B), top_k=None)
        for got, want in zip(sliced, whole):
            assert torch.equal(got, want)
    topk = _sample_triton(logits, 1.0, 3, torch.arange(B), top_k=5)
    monkeypatch.setattr(sampling, "_MAX_GRID_ROWS", 65535)
    assert torch.equal(topk.tokens, _sample_triton(logits, 1.0, 3, torch.arange(B), top_k=5).tokens)


def test_bad_launch_config_is_refused():
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        _sample_triton(random_logits(1, 100), 1.0, 0, None, config=LaunchConfig(48))
    with pytest.raises(ValueError, match="run length must be a power of two"):
        _sample_triton(random_logits(1, 100), 1.0, 0, None, config=LaunchConfig(64, run=128))
    with pytest.raises(ValueError, match="warps must be a power of two"):
        _sample_triton(random_logits(1, 100), 1.0, 0, None, config=LaunchConfig(64, warps=3))
    with pytest.raises(ValueError, match="loop must be at least 1"):
        _sample_triton(random_logits(1, 100), 1.0, 0, None, config=LaunchConfig(64, loop=0))
    with pytest.raises(ValueError, match="stages must be at least 1"):
        _sample_triton(random_logits(1, 100), 1.0, 0, None, config=LaunchConfig(64, stages=0))
    with pytest.raises(ValueError, match="persistent must be at least 0"):
        _sample_triton(
            random_logits(1, 100), 1.0, 0, None, config=LaunchConfig(64, fused=False, persistent=-1)
        )
    with pytest.raises(ValueError, match="set fused=False"):
        _sample_triton(random_logits(1, 100), 1.0, 0, None, config=LaunchConfig(64, persistent=4))


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        LaunchConfig(1024, 1, 2, 256, False),
        LaunchConfig(1024, 2),
        LaunchConfig(1024, 4),
        LaunchConfig(1024, 8, 4, 128, False),
        LaunchConfig(2048, 1, 2, 512),
        LaunchConfig(512, 1),
        LaunchConfig(1024, 1, loop=4),
        LaunchConfig(1024, 2, loop=3),
        LaunchConfig(1024, 1, loop=4, stages=2),
        LaunchConfig(1024, 4, loop=4, stages=3),
        LaunchConfig(1024, 1, fused=False, stages=2, persistent=16),
        LaunchConfig(1024, 4, fused=False, persistent=8),
    ],
    ids=str,
)
def test_gpu_launch_configs_agree_with_the_default(config):
    """The launches the GPU report's tuning rows time agree with the default launch. Not bit for
    bit: the chunk and run length change the sums; a uniform within rounding of a boundary may
    move a token."""
    B, V = 256, 151936
    logits, temps, seeds, pos = sampler_batch(B, V, torch.bfloat16)
    base = sample(logits, temps, seeds, pos)
    out = _sample_triton(logits, temps, seeds, pos, config=config)
    assert (out.tokens == base.tokens).float().mean() >= 0.99
    assert_close64(out, logits, temps)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    B, V = 8, 151936
    logits = torch.randn(B, V, device="cuda").bfloat16()
    temps = torch.ones(B, device="cuda")
    seeds = torch.arange(B, device="cuda")
    pos = torch.zeros(B, dtype=torch.int64, device="cuda")
    sample(logits, temps, seeds, pos)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(logits, temps, seeds, pos)
    for step in range(3):
        pos.fill_(step)
        graph.replay()
        want = sample(logits, temps, seeds, pos)
        assert torch.equal(out.tokens, want.tokens)


@pytest.mark.gpu
def test_gpu_fused_finish_is_stable_across_calls_and_graphs():
    """The fused finish step reads the row's chunk stats written by other programs (ordered by an
    acquire-release counter): repeated calls, graphs of two batch sizes (the counters grow between
    captures) and eager calls in between must all give the first call's results, and the separate
    finish kernel's tokens."""
    V = 151936
    logits = (torch.randn(1024, V, device="cuda") * 3).bfloat16()
    temps = torch.rand(1024, device="cuda") + 0.5
    seeds, pos = torch.arange(1024, device="cuda") * 7, torch.arange(1024, device="cuda")
    # The separate finish kernel sums a row's chunk stats in another order than the fused step (on
    # an H200 the entropy differed in its last bits): same tokens, values within rounding. Repeated
    # fused calls must agree bit for bit with the first.
    unfused = _sample_triton(
        logits, temps, seeds, pos, config=LaunchConfig(1024, warps=4, finish_warps=4, fused=False)
    )
    first = sample(logits, temps, seeds, pos)
    assert torch.equal(first.tokens, unfused.tokens)
    torch.testing.assert_close(first.logprobs, unfused.logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.entropy, unfused.entropy, rtol=1e-5, atol=1e-6)
    for _ in range(20):
        out = sample(logits, temps, seeds, pos)
        assert torch.equal(out.tokens, first.tokens)
        assert torch.equal(out.logprobs, first.logprobs) and torch.equal(out.entropy, first.entropy)
    graphs, outs = [], []
    for B in (64, 1024):
        sample(logits[:B], temps[:B], seeds[:B], pos[:B])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(sample(logits[:B], temps[:B], seeds[:B], pos[:B]))
        graphs.append(graph)
    for _ in range(5):
        for graph, out in zip(graphs, outs):
            graph.replay()
            sample(logits[:300], temps[:300], seeds[:300], pos[:300])
            torch.cuda.synchronize()
            assert torch.equal(out.tokens, unfused.tokens[: len(out.tokens)])
