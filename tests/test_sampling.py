"""Tests of the fused sampler against float64 and against its PyTorch reference.

On the CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest), which costs about
0.1 s per row, so kernel cases use a few rows; the statistical tests with many draws run on
``sample_ref`` (the same rule and the same uniforms, checked token-for-token against the kernel)
and, with more draws, on the kernel in the GPU-only tests.

Log-prob and entropy are checked against a float64 computation within ``helpers.RTOL * |x64| +
helpers.ATOL`` (``helpers.assert_close64``).
"""

import math

import pytest
import torch
from helpers import assert_close64, kept, random_logits, sampler_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from arpo_fast.kernels import SampleOutput, sample, sample_ref, sampling, sampling_ref
from arpo_fast.kernels.counter_rng import uniform53_ref
from arpo_fast.kernels.sampling import LaunchConfig, _sample_triton
from arpo_fast.kernels.sampling_ref import truncation_threshold

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _probs64(logits_row, temperature, keep_row=None):
    x = logits_row.double()
    if keep_row is not None:
        x = torch.where(keep_row, x, float("-inf"))
    t = temperature if temperature > 0 else 1.0
    return torch.softmax((x - x.max()) / t, dim=0)


def _chi2_threshold(df: int, alpha: float = 1e-4) -> float:
    """Upper alpha-quantile of chi-square(df): scipy if present, else Wilson-Hilferty."""
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(1 - alpha, df))
    except ImportError:
        z = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * alpha, dtype=torch.float64)).item()
        c = 2.0 / (9 * df)
        return df * (1 - c + z * math.sqrt(c)) ** 3


def _chi2(tokens, probs):
    """Chi-square statistic and degrees of freedom, pooling categories expected below 5 draws."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    assert counts[probs == 0].sum() == 0, "drew a token of probability zero"
    nz = exp > 0
    stat = float(((obs[nz] - exp[nz]) ** 2 / exp[nz]).sum())
    return stat, int(nz.sum()) - 1


# ------------------------------------------------------------------------------------------------
# Kernel (interpreted on the CPU): values against float64, tokens against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [1, 7, 1000, 32001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_float64_and_reference(V, dtype):
    B = 2 if V > 10000 else 3
    logits = random_logits(B, V, dtype)
    temps = torch.tensor([1.0, 0.7, 1.6])[:B]
    seeds = torch.arange(B) * 7919 + 11
    pos = torch.arange(B) + 100
    out = _sample_triton(logits, temps, seeds, pos)
    ref = sample_ref(logits, temps, seeds, pos)
    assert out.tokens.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert out.valid.all()
    assert torch.equal(out.tokens, ref.tokens)
    assert_close64(out, logits, temps)
    assert_close64(ref, logits, temps)


@pytest.mark.parametrize("temperature", [1e-3, 1e3, 0.0, 1.0])
@pytest.mark.parametrize("scale", [1e4, 5.0])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_kernel_extremes_masked_entries(temperature, scale):
    """Huge and tiny temperatures, logits of +-1e4, and half the entries masked with -inf."""
    B, V = 4, 1000
    logits = random_logits(B, V, scale=scale)
    logits[torch.rand(B, V) < 0.5] = float("-inf")
    logits[3, :-1] = float("-inf")  # a single finite entry: log-prob 0, entropy 0
    logits[3, -1] = 5.0
    out = _sample_triton(logits, temperature, 3, torch.arange(B))
    ref = sample_ref(logits, temperature, 3, torch.arange(B))
    assert out.valid.all()
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.isfinite(logits.gather(1, out.tokens[:, None])).all()
    assert out.tokens[3] == V - 1 and out.logprobs[3] == 0 and out.entropy[3] == 0
    assert_close64(out, logits, temperature)
    assert_close64(ref, logits, temperature)


def test_kernel_noncontiguous_views():
    """A row-strided view of a larger buffer, and a column-strided (transposed) one."""
    B, V = 3, 700
    big = random_logits(B, V + 50, torch.bfloat16)
    view = big[:, 17:17 + V]
    tall = random_logits(V, B).t()  # stride (1, B)
    for logits in (view, tall):
        out = _sample_triton(logits, 0.9, 5, torch.arange(B))
        dense = _sample_triton(logits.contiguous(), 0.9, 5, torch.arange(B))
        assert torch.equal(out.tokens, dense.tokens)
        assert torch.equal(out.logprobs, dense.logprobs) and torch.equal(out.entropy, dense.entropy)
        assert_close64(out, logits, 0.9)


def test_kernel_per_row_tensors_and_scalars_agree():
    B, V = 3, 300
    logits = random_logits(B, V)
    a = _sample_triton(logits, 0.8, 42, None)
    b = _sample_triton(logits, torch.full((B,), 0.8), torch.full((B,), 42), torch.zeros(B, dtype=torch.int64))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_public_sample_dispatches_to_kernel_under_interpreter():
    logits = random_logits(2, 50)
    out = sample(logits, 1.0, 9, torch.tensor([4, 5]))
    assert isinstance(out, SampleOutput)
    assert torch.equal(out.tokens, sample_ref(logits, 1.0, 9, torch.tensor([4, 5])).tokens)


# ------------------------------------------------------------------------------------------------
# Greedy, invalid rows
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["kernel", "ref"])
def test_greedy_is_argmax_with_ties_to_lowest_index(impl):
    B, V = 3, 200
    logits = random_logits(B, V)
    logits[0, [150, 20, 90]] = 50.0  # ties within a chunk and across chunks (chunk = 16 below)
    logits[1, [199, 5]] = 50.0
    run = (lambda *a: _sample_triton(*a, config=LaunchConfig(16))) if impl == "kernel" else sample_ref
    out = run(logits, 0.0, 1, torch.arange(B))
    assert out.tokens.tolist() == [20, 5, int(logits[2].argmax())]
    # log-prob and entropy of the untempered distribution
    assert_close64(out, logits, 1.0)


# numpy, under the interpreter, warns about the NaN and inf arithmetic these rows are made of.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", ["kernel", "ref"])
def test_invalid_rows_are_flagged_and_harm_no_other_row(impl):
    B, V = 5, 100
    logits = random_logits(B, V)
    logits[1, 37] = float("nan")
    logits[2] = float("-inf")
    logits[4, 3] = float("inf")
    run = _sample_triton if impl == "kernel" else sample_ref
    out = run(logits, 1.0, 8, torch.arange(B))
    assert out.valid.tolist() == [True, False, False, True, False]
    assert out.tokens[[1, 2, 4]].tolist() == [-1, -1, -1]
    assert torch.isnan(out.logprobs[[1, 2, 4]]).all() and torch.isnan(out.entropy[[1, 2, 4]]).all()
    alone = run(logits[[0, 3]], 1.0, 8, torch.tensor([0, 3]))
    assert torch.equal(out.tokens[[0, 3]], alone.tokens)
    assert torch.equal(out.logprobs[[0, 3]], alone.logprobs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_check_true_names_the_bad_rows():
    logits = random_logits(4, 30)
    logits[1, 0] = float("nan")
    logits[3] = float("-inf")
    with pytest.raises(ValueError, match=r"rows 1, 3"):
        sample(logits, check=True)
    with pytest.raises(ValueError, match=r"rows 1, 3"):
        sample_ref(logits, check=True)
    sample(logits[[0, 2]], check=True)  # good rows pass


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="logits must be"):
        sample(torch.randn(3))
    with pytest.raises(ValueError, match="logits must be"):
        sample(torch.randn(2, 5, dtype=torch.float64))
    for fn in (sample, sample_ref):
        with pytest.raises(ValueError, match="temperature must be"):
            fn(torch.randn(2, 5), temperature=torch.ones(3))
        with pytest.raises(ValueError, match="position must be"):
            fn(torch.randn(2, 5), position=torch.zeros(2, 1, dtype=torch.int64))
        with pytest.raises(ValueError, match="temperature is NaN"):
            fn(torch.randn(2, 5), temperature=float("nan"))


def test_empty_batch():
    out = sample(torch.randn(0, 10))
    assert out.tokens.shape == (0,) and out.valid.shape == (0,)


# ------------------------------------------------------------------------------------------------
# Invariance
# ------------------------------------------------------------------------------------------------


def test_kernel_row_token_independent_of_batch():
    """A row alone, at several places in a batch, and in a batch of another size: same token."""
    V = 7
    logits = random_logits(120, V)
    seeds, pos = torch.randint(0, 2**62, (120,)), torch.randint(0, 2**40, (120,))
    batch = _sample_triton(logits, 1.0, seeds, pos)
    for rows in ([0], [119], [5, 77, 3], list(range(30, 60))):
        part = _sample_triton(logits[rows], 1.0, seeds[rows], pos[rows])
        assert torch.equal(batch.tokens[rows], part.tokens)
        assert torch.equal(batch.logprobs[rows], part.logprobs)


def test_reference_row_token_independent_of_batch_of_1000():
    V = 1000
    logits = random_logits(1000, V)
    seeds, pos = torch.randint(0, 2**62, (1000,)), torch.arange(1000) * 3
    batch = sample_ref(logits, 0.9, seeds, pos)
    for r in (0, 1, 511, 999):
        alone = sample_ref(logits[r:r + 1], 0.9, seeds[r:r + 1], pos[r:r + 1])
        assert batch.tokens[r] == alone.tokens[0]


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


@pytest.mark.parametrize("config", [LaunchConfig(64, 2, 4, 64, True), LaunchConfig(64, 1, 2, 16, False),
                                    LaunchConfig(128, 4, 1, 128, False), LaunchConfig(64, 4, 1, 1, True),
                                    LaunchConfig(32, 8, 1, 32, True),
                                    LaunchConfig(32, 2, 1, 16, True, 3), LaunchConfig(64, 1, 2, 64, False, 4),
                                    LaunchConfig(16, 1, 2, 16, True, 4, 2),
                                    LaunchConfig(32, 2, 1, 8, True, 2, 3),
                                    LaunchConfig(16, 1, 2, 16, False, stages=2, persistent=3),
                                    LaunchConfig(32, 4, 1, 32, False, persistent=5)],
                         ids=str)
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
        got = _sample_triton(logits, temps, seeds, pos, top_k=40,
                             config=rows._replace(persistent=persistent))
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
        _sample_triton(random_logits(1, 100), 1.0, 0, None,
                       config=LaunchConfig(64, fused=False, persistent=-1))
    with pytest.raises(ValueError, match="set fused=False"):
        _sample_triton(random_logits(1, 100), 1.0, 0, None, config=LaunchConfig(64, persistent=4))


def test_same_inputs_same_tokens_and_seeds_matter():
    logits = random_logits(4, 500)
    a = _sample_triton(logits, 1.0, 123, torch.arange(4))
    b = _sample_triton(logits, 1.0, 123, torch.arange(4))
    assert torch.equal(a.tokens, b.tokens)
    flat = torch.zeros(1, 500).expand(64, 500)  # uniform rows: tokens are the uniforms' images
    toks = sample_ref(flat, 1.0, torch.arange(64), None).tokens
    assert toks.unique().numel() > 40


# ------------------------------------------------------------------------------------------------
# Uniforms
# ------------------------------------------------------------------------------------------------


def test_uniforms_are_uniform_and_cover_53_bits():
    n = 200_000
    seed = torch.full((n,), 987654321987)
    u = uniform53_ref(seed, torch.arange(n))
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    stat, df = _chi2((u * 100).long(), torch.full((100,), 0.01, dtype=torch.float64))
    assert stat < _chi2_threshold(df)
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(float(lag)) < 0.02
    low = ((u * 2.0**53).long() & ((1 << 26) - 1)).double() / 2**26  # low bits are random too
    assert abs(float(low.mean()) - 0.5) < 0.01
    u2 = uniform53_ref(torch.full((n,), 987654321988), torch.arange(n))  # neighbouring seed
    assert abs(float(torch.corrcoef(torch.stack([u, u2]))[0, 1])) < 0.02


# ------------------------------------------------------------------------------------------------
# Distribution: chi-square goodness of fit
# ------------------------------------------------------------------------------------------------

CHI2_CASES = [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=3.0),
    dict(temperature=1.0, top_k=3), dict(temperature=0.8, top_p=0.7),
    dict(temperature=1.2, top_k=5, top_p=0.8),
]


@pytest.mark.parametrize("case", CHI2_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_reference_chi_square(case):
    V, n = 12, 40_000
    row = torch.randn(1, V) * 1.5
    logits = row.expand(n, V)
    out = sample_ref(logits, case["temperature"], 2024, torch.arange(n),
                     case.get("top_k"), case.get("top_p"))
    keep = kept(row, case["temperature"], case.get("top_k"), case.get("top_p"))[0]
    stat, df = _chi2(out.tokens, _probs64(row[0], case["temperature"], keep))
    assert stat < _chi2_threshold(df), f"chi2 {stat:.1f} with {df} dof"


@pytest.mark.parametrize("case", [dict(temperature=0.7), dict(temperature=1.0, top_k=4, top_p=0.9)],
                         ids=["t0.7", "topk-topp"])
def test_kernel_chi_square(case):
    """Few draws (the interpreter is slow); the GPU test and the reference test draw many more."""
    V, n = 6, 150
    row = torch.tensor([[0.3, -1.0, 1.2, 0.0, -0.4, 0.8]])
    logits = row.expand(n, V)
    out = _sample_triton(logits, case["temperature"], 77, torch.arange(n), case.get("top_k"),
                         case.get("top_p"))
    keep = kept(row, case["temperature"], case.get("top_k"), case.get("top_p"))[0]
    stat, df = _chi2(out.tokens, _probs64(row[0], case["temperature"], keep))
    assert stat < _chi2_threshold(df), f"chi2 {stat:.1f} with {df} dof"


def test_reference_tail_token_drawn_at_its_rate():
    """A token 8 nats below the top (the rest 40 nats down): 3.4e-4 of 1M draws, ~335 hits."""
    V, n, chunks = 16, 1_000_000, 4
    row = torch.full((V,), -40.0)
    row[3], row[10] = 0.0, -8.0
    p = _probs64(row, 1.0)[10].item()
    hits = 0
    for c in range(chunks):
        pos = torch.arange(c * n // chunks, (c + 1) * n // chunks)
        hits += int((sample_ref(row[None].expand(pos.numel(), V), 1.0, 5, pos).tokens == 10).sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) < 5 * sd, f"{hits} hits, expected {n * p:.1f} +- {sd:.1f}"


def test_kernel_resolves_a_token_12_nats_down():
    """The kernel picks a token of mass 6e-6 exactly for the uniforms that land on it.

    Scans 3M positions for uniforms inside the tail token's CDF interval (float64), then runs the
    kernel on a few of those rows and on a few others. An fp32 Gumbel or fp32-uniform sampler
    cannot promise this; the rate itself is measured by the GPU test."""
    V = 4096
    row = torch.full((V,), -40.0)
    row[5], row[4000] = 0.0, -12.0
    probs = _probs64(row, 1.0)
    lo = float(probs[:4000].sum())
    hi = lo + float(probs[4000])
    pos = torch.arange(3_000_000)
    u = uniform53_ref(torch.full_like(pos, 31), pos)
    inside = pos[(u > lo + 1e-12) & (u < hi - 1e-12)][:3]
    outside = pos[(u < lo - 1e-9)][:3]
    assert inside.numel() == 3
    rows = torch.cat([inside, outside])
    out = _sample_triton(row[None].expand(6, V), 1.0, 31, rows)
    assert out.tokens.tolist() == [4000] * 3 + [5] * 3
    ref = sample_ref(row[None].expand(6, V), 1.0, 31, rows)
    assert torch.equal(out.tokens, ref.tokens)


# ------------------------------------------------------------------------------------------------
# Top-k / top-p
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (20, 0.9), (1, None), (None, 1.0)])
def test_truncation_threshold_keeps_the_right_set(top_k, top_p, dtype):
    """The threshold selects and sorts in the logits' own dtype (bf16 here has many ties)."""
    B, V = 6, 300
    logits = random_logits(B, V, dtype)
    lo = truncation_threshold(logits, 0.8, top_k, top_p)
    assert torch.equal(logits >= lo[:, None], kept(logits, 0.8, top_k, top_p))


def test_truncation_per_row_tensors():
    B, V = 4, 100
    logits = random_logits(B, V)
    k = torch.tensor([0, 3, 100, 10])
    p = torch.tensor([1.0, 0.5, 0.9, 1.0])
    lo = truncation_threshold(logits, 1.0, k, p)
    for b in range(B):
        kb = int(k[b]) if 0 < k[b] < V else None
        want = kept(logits[b:b + 1], 1.0, kb, float(p[b]))[0]
        assert torch.equal(logits[b] >= lo[b], want)


def test_truncation_values_that_keep_everything_take_the_one_pass_path(monkeypatch):
    """top_k=-1/0/V and top_p=1.0 (common ways to say "off") sort nothing and give the
    untruncated result bit for bit, kernel and reference alike."""
    B, V = 3, 300
    logits = random_logits(B, V)
    temps, seeds, pos = torch.tensor([1.0, 0.5, 0.0]), torch.arange(B), torch.arange(B)
    want = [sample(logits, temps, seeds, pos), sample_ref(logits, temps, seeds, pos)]

    def no_threshold(*args):
        raise AssertionError("a truncation that keeps every entry computed a threshold")

    monkeypatch.setattr(sampling, "truncation_threshold_triton", no_threshold)
    monkeypatch.setattr(sampling_ref, "truncation_threshold", no_threshold)
    for top_k, top_p in ((-1, 1.0), (0, None), (V, None), (None, 1.0), (V + 5, 1.5)):
        got = [sample(logits, temps, seeds, pos, top_k, top_p),
               sample_ref(logits, temps, seeds, pos, top_k, top_p)]
        for out, ref in zip(got, want):
            for a, b in zip(out, ref):
                assert torch.equal(a, b)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, None, 1.0), (None, 0.6, 0.7), (40, 0.9, 0.0)])
def test_kernel_top_k_top_p_values(top_k, top_p, temperature):
    B, V = 3, 400
    logits = random_logits(B, V, torch.bfloat16)
    out = _sample_triton(logits, temperature, 6, torch.arange(B), top_k, top_p)
    ref = sample_ref(logits, temperature, 6, torch.arange(B), top_k, top_p)
    keep = kept(logits, temperature, top_k, top_p)
    assert torch.equal(out.tokens, ref.tokens)
    assert keep.gather(1, out.tokens[:, None]).all()
    assert_close64(out, logits, temperature, keep)
    assert_close64(ref, logits, temperature, keep)


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [1000, 32001, 151936])
def test_gpu_values_and_tokens(V, dtype):
    B = 64
    logits, temps, seeds, pos = sampler_batch(B, V, dtype)
    out = sample(logits, temps, seeds, pos)
    ref = sample_ref(logits, temps, seeds, pos)
    assert (out.tokens == ref.tokens).float().mean() >= 0.98  # float-rounding ties at boundaries
    assert_close64(out, logits, temps)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [LaunchConfig(1024, 1, 2, 256, False), LaunchConfig(1024, 2),
                                    LaunchConfig(1024, 4), LaunchConfig(1024, 8, 4, 128, False),
                                    LaunchConfig(2048, 1, 2, 512), LaunchConfig(512, 1),
                                    LaunchConfig(1024, 1, loop=4), LaunchConfig(1024, 2, loop=3),
                                    LaunchConfig(1024, 1, loop=4, stages=2),
                                    LaunchConfig(1024, 4, loop=4, stages=3),
                                    LaunchConfig(1024, 1, fused=False, stages=2, persistent=16),
                                    LaunchConfig(1024, 4, fused=False, persistent=8)],
                         ids=str)
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
def test_gpu_invariance_batch_of_1000():
    V = 151936
    logits = torch.randn(1000, V, device="cuda").bfloat16()
    seeds = torch.randint(0, 2**62, (1000,), device="cuda")
    pos = torch.arange(1000, device="cuda")
    batch = sample(logits, 1.0, seeds, pos)
    for r in (0, 17, 999):
        alone = sample(logits[r:r + 1], 1.0, seeds[r:r + 1], pos[r:r + 1])
        assert batch.tokens[r] == alone.tokens[0] and batch.logprobs[r] == alone.logprobs[0]
    other = _sample_triton(logits[:200], 1.0, seeds[:200], pos[:200], config=LaunchConfig(512))
    assert (other.tokens == batch.tokens[:200]).float().mean() >= 0.99


@pytest.mark.gpu
def test_gpu_chi_square():
    V, n = 12, 2_000_000
    # A fixed spread of logits: every case keeps several tokens (a random row can leave top-p a
    # single token, and then there is nothing to test).
    row = torch.linspace(-2.0, 1.0, V)[torch.tensor([3, 11, 0, 7, 5, 9, 1, 10, 2, 8, 6, 4])][None].cuda()
    for case in CHI2_CASES:
        out = sample(row.expand(n, V), case["temperature"], 99, torch.arange(n, device="cuda"),
                     case.get("top_k"), case.get("top_p"))
        keep = kept(row.cpu(), case["temperature"], case.get("top_k"), case.get("top_p"))[0]
        stat, df = _chi2(out.tokens.cpu(), _probs64(row[0].cpu(), case["temperature"], keep))
        assert df >= 2, f"{case}: only {df + 1} categories"
        assert stat < _chi2_threshold(df), f"{case}: chi2 {stat:.1f} with {df} dof"


@pytest.mark.gpu
def test_gpu_far_tail_token_drawn_at_its_rate():
    """A token 12 nats below the top, V = 151936, 2^26 draws: expected ~412 hits."""
    V, B, reps = 151936, 1 << 20, 64
    row = torch.full((V,), -40.0, device="cuda")
    row[7], row[150_001] = 0.0, -12.0
    p = _probs64(row.cpu(), 1.0)[150_001].item()
    logits = row.bfloat16()[None].expand(B, V)  # row stride 0: one row in memory
    pos = torch.arange(B, device="cuda")
    hits = sum(int((sample(logits, 1.0, r, pos).tokens == 150_001).sum()) for r in range(reps))
    n = B * reps
    sd = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) < 5 * sd, f"{hits} hits, expected {n * p:.1f} +- {sd:.1f}"


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
    captures) and eager calls in between must all give the separate finish kernel's results."""
    V = 151936
    logits = (torch.randn(1024, V, device="cuda") * 3).bfloat16()
    temps = torch.rand(1024, device="cuda") + 0.5
    seeds, pos = torch.arange(1024, device="cuda") * 7, torch.arange(1024, device="cuda")
    # The default runs the fused finish step with its four warps; a finish kernel of four warps
    # lays the row out the same way, so every sum is taken in the same order.
    unfused = _sample_triton(logits, temps, seeds, pos,
                             config=LaunchConfig(1024, warps=4, finish_warps=4, fused=False))
    for _ in range(20):
        out = sample(logits, temps, seeds, pos)
        assert torch.equal(out.tokens, unfused.tokens)
        assert torch.equal(out.logprobs, unfused.logprobs) and torch.equal(out.entropy, unfused.entropy)
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
            assert torch.equal(out.tokens, unfused.tokens[:len(out.tokens)])


def test_large_python_seeds_wrap_like_int64_tensors():
    logits = random_logits(3, 40)
    big = 2**64 - 5  # the same 64 bits as the int64 -5
    a = _sample_triton(logits, 1.0, big, torch.arange(3))
    b = _sample_triton(logits, 1.0, torch.full((3,), -5), torch.arange(3))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens, sample_ref(logits, 1.0, big, torch.arange(3)).tokens)
    c = _sample_triton(logits, 1.0, 1, torch.arange(3))  # 1 must not be specialised away
    assert torch.equal(c.tokens, sample_ref(logits, 1.0, 1, torch.arange(3)).tokens)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 5), V=st.integers(1, 300), temp=st.sampled_from([0.0, 1e-3, 0.3, 1.0, 7.0]),
       scale=st.sampled_from([0.1, 3.0, 1e4]), masked=st.floats(0.0, 0.9),
       dtype=st.sampled_from(DTYPES), seed=st.integers(-2**63, 2**63 - 1))
def test_reference_properties(B, V, temp, scale, masked, dtype, seed):
    """Any rows: a valid token has a finite logit, log-prob <= 0, 0 <= entropy <= ln(live entries),
    and the values match float64."""
    g = torch.Generator().manual_seed(abs(seed) % 2**31)
    logits = (torch.randn(B, V, generator=g) * scale).to(dtype)
    logits[torch.rand(B, V, generator=g) < masked] = float("-inf")
    out = sample_ref(logits, temp, seed, torch.arange(B))
    live = torch.isfinite(logits.float())
    assert torch.equal(out.valid, live.any(1))
    ok = out.valid
    assert torch.isfinite(logits.float()[ok].gather(1, out.tokens[ok][:, None])).all()
    assert (out.logprobs[ok] <= 0).all()
    tol = 1e-5 * math.log(V + 1)
    assert (out.entropy[ok] >= -tol).all()
    assert (out.entropy[ok] <= live[ok].sum(1).double().log() + tol).all()
    if ok.all():
        assert_close64(out, logits, temp)
