"""Fused sampler: one read of the logits gives the sampled token, its log-prob and the entropy.

The usual path (softmax, multinomial, an entropy reduction, a gather) reads the logits four or more
times and draws one random number per vocabulary entry. Here no entry gets a random number. The
exact two-step scheme:

1. The streaming pass, grid (chunk groups, B): each warp reads one chunk of 1024 entries of one row
   once and writes its max ``m`` (raw logit units), ``s = sum 2^d`` and ``w = sum 2^d * d`` with
   ``d = x * scale - r``, ``scale = log2(e) / T`` and the chunk's reference ``r = m * scale``, and
   the sums of ``2^d`` over its runs of 256 entries (the finish step's map of the chunk). A warp's
   reductions stay inside the warp.
2. The finish step, once per row: merges the chunk stats into log Z and the entropy
   ``H = ln S - ln 2 * W / S``, then inverts the CDF of the whole row with a single uniform
   ``u`` in [0, 1): ``u * S`` picks a chunk by cumulative chunk mass, a run inside it by cumulative
   run mass, and a token inside the run by cumulative mass within it (it re-reads those 256
   entries only). By default the last program of a row to finish its chunks does this (it counts
   arrivals in a per-row counter that it then resets), so the sampler is one kernel launch;
   ``LaunchConfig(fused=False)`` runs it as a second kernel instead.

``d`` is one fused multiply-add per entry. Its product ``x * scale`` is exact inside the FMA, so
``d`` is accurate to fp32 rounding even for logits of 1e4 at T = 1e-3 (where ``x * scale`` is
about 1.4e7); the reference ``r`` rounds, so the max entry has ``d = rho``, the rounding residual
of ``m * scale``, not 0. The finish step works relative to that entry (log-prob from
``ln e_tok - ln S``, entropy from ``ln S - ln e_max`` and ``W - rho S``), so a one-hot row still
gets log-prob and entropy exactly 0.

The uniform has 53 bits (``counter_rng``), and the cumulative sums are taken in float64, so
tokens far below the top (12 nats and more) are drawn at their true rate: an fp32 uniform would
only resolve masses above about 6e-8, and fp32 Gumbel noise caps near 16 nats. Constants such as
log2(e) = 1.4426950408889634 and ln 2 = 0.6931471805599453 appear as literals in the kernels.
The token is the inverse CDF of one uniform that depends only on (seed, position), so it does not
depend on the batch, on B, or on the launch (chunk and run sizes move it only through float
rounding of the cumulative sums: a uniform landing within about 1e-7 of a token boundary can move
by one token).

Ids at and past ``vocab_limit`` (an output layer's rows past the tokenizer's vocabulary) are outside
the pass: the kernels read the first ``vocab_limit`` entries of each row through a strided view, so
the limit costs nothing, and those ids are never sampled nor counted in log Z and the entropy.

Greedy rows (temperature <= 0) take the argmax (ties to the lowest index) and report log-prob and
entropy of the untempered distribution. Top-k/top-p take a second path: a per-row logit threshold
(``truncation.py``: candidates from ``torch.topk`` or ``torch.sort``, then one kernel) and then the
same kernels with entries below the threshold treated as -inf.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._dispatch import cdiv, next_power_of_2, row_arg, use_triton
from .sampling_kernels import _sample_finish_kernel, _sample_kernel, _sample_persistent_kernel
from .sampling_ref import (
    SampleOutput,
    TensorOrFloat,
    TensorOrInt,
    active_truncation,
    check_args,
    raise_if_invalid,
    sample_ref,
    seed_int64,
    within_vocab,
)
from .truncation import truncation_threshold_triton

# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


class LaunchConfig(NamedTuple):
    """How the sampler is launched.

    ``chunk`` (entries per record of the streaming pass) and ``run`` (entries per run sum, which
    the finish step re-reads; divides the chunk; None: min(chunk, 256)) are powers of two and
    enter the sampled arithmetic, then only at float-rounding level. The rest are speed choices:
    ``warps`` (warps per program of the streaming pass, each reading its own chunks), ``loop``
    (chunks each warp reads, one after another), ``stages`` (above 1: Triton pipelines a warp's
    full chunks, copying the next ones into shared memory while it works on one; needs ``loop``
    above 1 to matter), ``finish_warps`` (of the separate finish kernel), ``fused`` (the last
    program of each row finishes it, so there is one kernel) and ``persistent`` (above 0: that
    many streaming programs per SM, each taking an equal share of the batch's chunks across rows,
    in place of a grid over rows; ``loop`` is then unused, and it needs ``fused=False``)."""

    chunk: int
    warps: int = 1
    finish_warps: int = 2
    run: int | None = None
    fused: bool = True
    loop: int = 1
    stages: int = 1
    persistent: int = 0


def _default_config(V: int) -> LaunchConfig:
    """A function of V only (never of B), so a row's token is the same in any batch: chunks of
    1024 entries (a power of two >= 16 covering a smaller V), four warps per program (fewer when
    the row has fewer chunks: its chunk count rounded up to a power of two) and the finish step
    fused. ``benchmarks/RESULTS.md`` says how this default was chosen."""
    chunk = 1024 if V >= 1024 else max(16, next_power_of_2(V))
    warps = min(4, next_power_of_2(cdiv(V, chunk)))
    return LaunchConfig(chunk, warps, 2, None, True)


def _resolved(config: LaunchConfig) -> LaunchConfig:
    """The config with its run length filled in, once checked."""
    chunk = config.chunk
    run = min(chunk, 256) if config.run is None else config.run
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"the chunk must be a power of two >= 16, got {chunk}")
    if run < 1 or run & (run - 1) or run > chunk:
        raise ValueError(f"the run length must be a power of two <= the chunk {chunk}, got {run}")
    if config.warps < 1 or config.warps & (config.warps - 1):
        raise ValueError(f"warps must be a power of two, got {config.warps}")
    if config.loop < 1:
        raise ValueError(f"loop must be at least 1, got {config.loop}")
    if config.stages < 1:
        raise ValueError(f"stages must be at least 1, got {config.stages}")
    if config.persistent < 0:
        raise ValueError(f"persistent must be at least 0, got {config.persistent}")
    if config.persistent and config.fused:
        raise ValueError(
            "a persistent streaming pass leaves the finish step to its own kernel: set fused=False"
        )
    return config._replace(run=run)


# Per (device, stream): the fused kernel's per-row arrival counters, int32, zero between calls (the
# last program of a row resets its counter). A grown buffer never frees the old one: a captured
# CUDA graph may still point at it.
_COUNTERS: dict[tuple, list[torch.Tensor]] = {}


def _row_counters(device: torch.device, B: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    kept = _COUNTERS.setdefault((str(device), stream), [])
    if not kept or kept[-1].numel() < B:
        kept.append(torch.zeros(max(B, 1024), dtype=torch.int32, device=device))
    return kept[-1]


_MAX_GRID_ROWS = 65535  # CUDA's limit on the grid's second dimension
_SM_COUNTS: dict[str, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs programs in
    turn)."""
    if device.type != "cuda":
        return 1
    key = str(device)
    if key not in _SM_COUNTS:
        _SM_COUNTS[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[key]


def _launch(
    logits: torch.Tensor,
    temperature,
    seed,
    position,
    lo,
    config: LaunchConfig | None = None,
    finish: bool = True,
) -> SampleOutput:
    """Run the kernels on logits [B, V] (any strides); lo: fp32 [B] threshold or None.
    ``config`` replaces the default launch config (tests and tuning). ``finish=False`` runs the
    streaming pass alone (benchmarks time it separately); the outputs are then left unwritten."""
    if (logits.shape[1] - 1) * abs(logits.stride(1)) >= 2**31:
        logits = logits.contiguous()  # the kernels index columns in int32
    B, V = logits.shape
    dev = logits.device
    config = _resolved(config or _default_config(V))
    temp = row_arg(temperature, B, torch.float32, dev)
    seed = row_arg(seed, B, torch.int64, dev)
    pos_t = None if position is None else row_arg(position, B, torch.int64, dev)[0]
    if B > _MAX_GRID_ROWS:  # rows are independent: launch slices of them

        def rows(v, i):
            return v[i : i + _MAX_GRID_ROWS] if isinstance(v, torch.Tensor) else v

        parts = [
            _launch(
                rows(logits, i),
                rows(_either(temp), i),
                rows(_either(seed), i),
                rows(pos_t, i),
                rows(lo, i),
                config,
                finish,
            )
            for i in range(0, B, _MAX_GRID_ROWS)
        ]
        return SampleOutput(*(torch.cat(field) for field in zip(*parts)))
    out = SampleOutput(
        torch.empty(B, dtype=torch.int64, device=dev),
        torch.empty(B, dtype=torch.float32, device=dev),
        torch.empty(B, dtype=torch.float32, device=dev),
        torch.empty(B, dtype=torch.bool, device=dev),
    )
    if B > 0:
        _run_kernels(logits, temp, seed, pos_t, lo, config, finish, out)
    return out


def _either(arg):
    """A ``row_arg`` pair (tensor, None) or (None, number) as the one value it holds."""
    return arg[1] if arg[0] is None else arg[0]


def _run_kernels(
    logits, temp, seed, pos_t, lo, config: LaunchConfig, finish: bool, out: SampleOutput
) -> None:
    """The launches of ``_launch`` for B in [1, _MAX_GRID_ROWS] rows; temp and seed are
    ``row_arg`` pairs, pos_t an int64 [B] tensor or None. Writes ``out`` when ``finish``."""
    B, V = logits.shape
    dev = logits.device
    chunk, run, W = config.chunk, config.run, config.warps
    nc = cdiv(V, chunk)
    runs = chunk // run
    # A run as [G, I]: I entries are 8 lanes x 16 bytes (64 bf16 or 32 fp32), so 8 lanes share a
    # run; this only shapes the layout, never the arithmetic.
    inner = min(run, 128 // logits.element_size())
    # One allocation: chunk records (m, s, w, m) [B, nc, 4], then run sums c [B, nc, runs].
    buf = torch.empty((4 + runs) * B * nc, dtype=torch.float32, device=dev)
    rec, c = buf[: 4 * B * nc], buf[4 * B * nc :]
    fused = finish and config.fused
    args, flags = _kernel_args(logits, temp, seed, pos_t, lo, rec, c, nc)
    dummy = rec  # stands in for absent optional pointers; never read
    # maxnreg: the finish step inside the fused kernel would take it to 79 registers on sm_90;
    # capped at 64 one-warp programs fill the 32 blocks an SM can hold (no spills with triton 3.6;
    # with triton 3.9 the fused kernel spills a few dozen bytes).
    ncf = V // chunk  # full chunks per row
    if config.persistent and W <= ncf and B * ncf < 2**31:
        _launch_persistent(args, rec, c, (B, V, nc, ncf), config, inner, flags)
    else:  # (persistent programs need W <= ncf, and int32 chunk counts)
        _sample_kernel[(cdiv(nc, W * config.loop), B)](
            *args,
            _row_counters(dev, B) if fused else dummy,
            *out,
            V,
            nc,
            RUNS=runs,
            G=run // inner,
            I=inner,
            W=W,
            LOOP=config.loop,
            FUSED=fused,
            STAGES=config.stages,
            **flags,
            num_warps=W,
            maxnreg=64,
        )
    if finish and not fused:
        _sample_finish_kernel[(B,)](
            *args, *out, V, nc, RUNS=runs, RUN=run, **flags, num_warps=config.finish_warps
        )


def _launch_persistent(args, rec, c, sizes, config: LaunchConfig, inner: int, flags: dict) -> None:
    """The persistent streaming kernel: each program takes ``per_program`` of the B x ncf full
    chunks in turn (``sizes``: B, V, nc, ncf), about ``config.persistent`` programs an SM."""
    B, V, nc, ncf = sizes
    run, W = config.run, config.warps
    runs = config.chunk // run
    steps = cdiv(B * ncf, W)
    per_program = cdiv(steps, min(steps, config.persistent * _sm_count(rec.device)))
    _sample_persistent_kernel[(cdiv(steps, per_program),)](
        *args[:6],
        rec,
        c,
        B,
        V,
        nc,
        ncf,
        per_program,
        steps,
        RUNS=runs,
        G=run // inner,
        I=inner,
        W=W,
        PER_ROW_TEMP=flags["PER_ROW_TEMP"],
        HAS_LO=flags["HAS_LO"],
        STAGES=config.stages,
        num_warps=W,
        maxnreg=64,
    )


def _kernel_args(logits, temp, seed, pos_t, lo, rec, c, nc: int) -> tuple[tuple, dict]:
    """(args, flags): the arguments the three kernels share, in their order, and the constexpr
    flags saying which optional ones are present (an absent pointer is ``rec``, never read)."""
    (temp_t, temp_s), (seed_t, seed_s) = temp, seed
    dummy = rec  # stands in for absent optional pointers; never read
    args = (
        logits,
        logits.stride(0),
        logits.stride(1),
        temp_t if temp_t is not None else dummy,
        0.0 if temp_t is not None else float(temp_s),
        lo if lo is not None else dummy,
        seed_t if seed_t is not None else dummy,
        0 if seed_t is not None else int(seed_s),
        pos_t if pos_t is not None else dummy,
        rec,
        c,
    )
    flags = dict(
        BLOCK_NC=max(16, next_power_of_2(nc)),
        PER_ROW_TEMP=temp_t is not None,
        HAS_LO=lo is not None,
        PER_ROW_SEED=seed_t is not None,
        HAS_POS=pos_t is not None,
    )
    return args, flags


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _sample_triton(
    logits, temperature=1.0, seed=0, position=None, top_k=None, top_p=None, config: LaunchConfig | None = None
) -> SampleOutput:
    """The Triton path; top_k and top_p as ``active_truncation`` returns them (None: off);
    ``config`` overrides the launch (tests, tuning)."""
    lo = None
    if top_k is not None or top_p is not None:
        lo = truncation_threshold_triton(logits, temperature, top_k, top_p)
    return _launch(logits, temperature, seed_int64(seed), position, lo, config)


def sample(
    logits: torch.Tensor,
    temperature: TensorOrFloat = 1.0,
    seed: TensorOrInt = 0,
    position: torch.Tensor | None = None,
    top_k: TensorOrInt | None = 0,
    top_p: TensorOrFloat | None = 1.0,
    *,
    vocab_limit: int | None = None,
    check: bool = False,
) -> SampleOutput:
    """Sample one token per row, with its log-prob and the distribution's entropy.

    Args:
        logits: [B, V] float32, bfloat16 or float16; any strides (a view of a larger buffer works).
        temperature: float, or float32 [B]. 0 (or below) means greedy: the argmax, ties to the lowest
            index, with log-prob and entropy of the untempered (T = 1) distribution.
        seed: int, or int64 [B]. position: int64 [B], or None for zeros. The noise is a function of
            (seed, position) only: a row's token does not depend on its batch, and rows sharing
            (seed, position) share their uniform, so give each row its own pair for independent
            draws (a trajectory's seed and its token position). Pass tensors under CUDA-graph
            capture, or every replay reuses the captured numbers.
        top_k: int, or int64 [B]: keep each row's k most likely entries. 0 (the default) is off,
            as in ``SamplingParams`` and the trainer's ``--top-k``; so are k < 0, k >= V and None.
        top_p: float, or float32 [B]: keep the smallest set of most likely entries whose mass
            reaches p, applied after top-k. 1.0 (the default) is off, as in ``SamplingParams``
            and ``--top-p``; so are p > 1 and None. Either one takes the second path (a sort or
            top-k in PyTorch, then the kernels) unless it is a number that is off: then nothing
            is sorted.
        vocab_limit: int >= 1, or None: ids >= vocab_limit are never sampled, and log-prob and
            entropy are those of the distribution over the ids below it (as if the row had
            vocab_limit entries). For an output layer with rows past the tokenizer's vocabulary
            (Qwen2.5: 151,936 rows, 151,665 ids), pass len(tokenizer). The pass reads only the
            first vocab_limit entries of each row: no extra pass, no copy. None, or a limit >= V,
            is off.
        check: raise a ValueError naming the invalid rows (a host sync).

    Returns:
        SampleOutput(tokens int64 [B], logprobs float32 [B], entropy float32 [B], valid bool [B]).
        Log-prob and entropy are of the distribution actually sampled from. Rows with a NaN or +inf
        entry, or all -inf, get valid False, token -1 and NaN log-prob and entropy.

    CUDA tensors run the Triton kernels; CPU tensors run ``sample_ref`` unless TRITON_INTERPRET=1.
    The default path (no top-k/top-p) makes no host syncs and is CUDA-graph capturable.
    """
    check_args(logits, temperature=temperature, seed=seed, position=position, top_k=top_k, top_p=top_p)
    logits = within_vocab(logits, vocab_limit)  # a view: the kernels' pass stops at the limit
    top_k, top_p = active_truncation(top_k, top_p, logits.shape[1])
    if use_triton(logits):
        out = _sample_triton(logits, temperature, seed, position, top_k, top_p)
    else:
        out = sample_ref(logits, temperature, seed, position, top_k, top_p)
    if check:
        raise_if_invalid(out)
    return out
