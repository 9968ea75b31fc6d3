"""GPU report section: the fused sampler against PyTorch samplers, and its correctness at full size.

Speed, bf16 logits, V = 151936 (Qwen2's vocabulary), B in {1, 16, 64, 256, 1024}:
  - ours, eager and replayed inside a CUDA graph (how the engine runs decode steps);
  - the floor: B x V x 2 bytes / measured copy bandwidth, and our % of it;
  - peers in the same run: PyTorch eager (log_softmax, multinomial, entropy, gather), the
    exponential race written in PyTorch, and ``torch.compile`` of that race;
  - the top-k/top-p path (k = 50, p = 0.9) against a sort-based PyTorch top-k/top-p sampler.
Correctness at V = 151936: tokens against ``sample_ref``, log-prob/entropy against float64,
chi-square goodness of fit, and the far-tail rate (a token 12 nats below the top).

``rows(smoke=True)`` runs tiny sizes on any machine (the Triton interpreter on a CPU) to check
that the script works; its numbers mean nothing.
"""

from __future__ import annotations

import math

import torch
from report import Row, bench_us, copy_bandwidth_gbs
from report import load_kernels as _kernels

SECTION = "sampling"
V_FULL = 151936
TOP_K, TOP_P = 50, 0.9


# ----------------------------------------------------------------------------------------------
# Peers (also used by bench_sampling.py)
# ----------------------------------------------------------------------------------------------


def torch_eager(logits, temperature):
    """The usual path: log_softmax, multinomial, entropy, gather. logits [B, V], temperature [B]."""
    logp = torch.log_softmax(logits.float() / temperature[:, None], dim=-1)
    probs = logp.exp()
    tok = torch.multinomial(probs, 1)
    entropy = -(probs * logp).sum(-1)
    return tok[:, 0], logp.gather(1, tok)[:, 0], entropy


def exp_race(logits, temperature):
    """vLLM's sampler in PyTorch: argmax of p / Exp(1) noise (no host sync), plus log-prob and
    entropy. logits [B, V], temperature [B]."""
    logp = torch.log_softmax(logits.float() / temperature[:, None], dim=-1)
    probs = logp.exp()
    tok = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
    entropy = -(probs * logp).sum(-1)
    return tok, logp.gather(1, tok[:, None])[:, 0], entropy


def torch_top_k_top_p(logits, temperature, k: int | None, p: float):
    """Sort-based top-k then top-p in PyTorch, then sample; log-prob and entropy of the truncated
    distribution. logits [B, V], temperature [B]; k None: top-p alone."""
    x = logits.float() / temperature[:, None]
    vals, idx = torch.sort(x, dim=-1, descending=True)
    if k is not None:
        vals[:, k:] = float("-inf")
    probs = torch.softmax(vals, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= p
    vals = vals.masked_fill(drop, float("-inf"))
    logp = torch.log_softmax(vals, dim=-1)
    probs = logp.exp()
    pick = torch.multinomial(probs, 1)
    entropy = -torch.where(probs > 0, probs * logp, 0.0).sum(-1)
    return idx.gather(1, pick)[:, 0], logp.gather(1, pick)[:, 0], entropy


def _compiled_race():
    return torch.compile(exp_race, dynamic=True)


# ----------------------------------------------------------------------------------------------
# Speed
# ----------------------------------------------------------------------------------------------


def _try_us(name, fn, failures, **kw):
    """bench_us(fn), or None (with the reason kept) if the peer fails: the section goes on."""
    try:
        return bench_us(fn, **kw)
    except Exception as exc:
        failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
        print(f"(sampling: {name} failed: {failures[name]})")
        return None


def _graph_us(fn, **kw):
    """Time of replaying ``fn`` captured in a CUDA graph (fn is run once before, to compile)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_us(graph.replay, **kw)


def _speed_inputs(B, V, dtype, device):
    """The timed workload: logits [B, V] of dtype (N(0, 9)), temperature 0.8, distinct seeds."""
    gen = torch.Generator(device=device).manual_seed(B)
    logits = (torch.randn(B, V, device=device, generator=gen) * 3).to(dtype)
    temps = torch.full((B,), 0.8, device=device)
    seeds = torch.arange(B, device=device) + 1000
    pos = torch.zeros(B, dtype=torch.int64, device=device)
    return logits, temps, seeds, pos


def _floor_us(logits, bw_gbs) -> float:
    """Reading the logits once at the measured copy bandwidth, in microseconds."""
    return logits.numel() * logits.element_size() / (bw_gbs * 1e3)


def _speed_rows(k, B, V, dtype, device, bw_gbs, compiled, smoke) -> list[Row]:
    logits, temps, seeds, pos = _speed_inputs(B, V, dtype, device)
    kw = dict(warmup=1, reps=3) if smoke else {}
    case = f"B={B} V={V} {str(dtype).replace('torch.', '')}"
    fails: dict[str, str] = {}

    ours = bench_us(lambda: k.sample(logits, temps, seeds, pos), **kw)
    peers = {
        "PyTorch eager": _try_us("PyTorch eager", lambda: torch_eager(logits, temps), fails, **kw),
        "exp race (PyTorch)": _try_us("exp race", lambda: exp_race(logits, temps), fails, **kw),
    }
    if compiled is not None:
        peers["torch.compile race"] = _try_us(
            "torch.compile race", lambda: compiled(logits, temps), fails, **kw
        )
    rows = [Row(SECTION, case, "us eager", ours, name, us) for name, us in peers.items() if us]
    rows += [Row(SECTION, case, f"({name} failed: {why[:60]})", ours) for name, why in fails.items()]

    floor = _floor_us(logits, bw_gbs)
    rows.append(Row(SECTION, case, "floor us (B*V*bytes / copy bandwidth)", floor))
    rows.append(Row(SECTION, case, "% of floor (eager)", 100 * floor / ours))
    if device == "cuda":
        rows += _graph_rows(k, case, (logits, temps, seeds, pos), floor, peers["PyTorch eager"])
    rows += _truncation_rows(k, case, (logits, temps, seeds, pos), device, fails, kw)
    return rows


def _graph_rows(k, case: str, inputs, floor: float, eager: float) -> list[Row]:
    """The sampler in CUDA graphs: alone, 20 calls in one graph (large B), the streaming pass."""
    logits, temps, seeds, pos = inputs
    B = logits.shape[0]
    rows = []
    graph = _graph_us(lambda: k.sample(logits, temps, seeds, pos))
    small, large = B <= 16, B >= 256
    rows.append(
        Row(
            SECTION,
            case,
            "us CUDA graph",
            graph,
            "PyTorch eager",
            eager,
            "<= 15 us" if small else "",
            (graph <= 15.0) if small else None,
        )
    )
    pct = 100 * floor / graph
    rows.append(
        Row(
            SECTION,
            case,
            "% of floor (CUDA graph)",
            pct,
            "",
            None,
            ">= 70%" if large else "",
            (pct >= 70.0) if large else None,
        )
    )
    if large:
        # Inside an engine's decode graph the sampler shares the graph's launch: 20 calls in
        # one graph, over 4 logits buffers in turn (each evicted from L2 by the next three).
        bufs = [logits] + [torch.randn_like(logits) for _ in range(3)]
        many = _graph_us(lambda: [k.sample(bufs[i % 4], temps, seeds, pos) for i in range(20)]) / 20
        rows.append(Row(SECTION, case, "us per call, 20 calls in one CUDA graph", many, "floor us", floor))
        del bufs
    # The streaming pass alone: what the finish step (one row each) adds is the difference.
    stats = _graph_us(lambda: k.sampling._launch(logits, temps, seeds, pos, None, finish=False))
    rows.append(Row(SECTION, case, "us CUDA graph, streaming pass alone", stats, "floor us", floor))

    return rows


def _truncation_rows(k, case: str, inputs, device: str, fails: dict, kw: dict) -> list[Row]:
    """Top-k/top-p and top-p alone against PyTorch's sort, eager (and in a CUDA graph at B <= 16)."""
    logits, temps, seeds, pos = inputs
    B = logits.shape[0]
    rows = []
    topkp = bench_us(lambda: k.sample(logits, temps, seeds, pos, top_k=TOP_K, top_p=TOP_P), **kw)
    peer = _try_us("PyTorch top-k/top-p", lambda: torch_top_k_top_p(logits, temps, TOP_K, TOP_P), fails, **kw)
    rows.append(
        Row(SECTION, case, f"us eager, top-k {TOP_K} top-p {TOP_P}", topkp, "PyTorch sort top-k/top-p", peer)
    )
    if device == "cuda" and B <= 16:  # the path has no host syncs: it can sit in a decode graph
        try:
            graph = _graph_us(lambda: k.sample(logits, temps, seeds, pos, top_k=TOP_K, top_p=TOP_P))
            rows.append(
                Row(
                    SECTION,
                    case,
                    f"us CUDA graph, top-k {TOP_K} top-p {TOP_P}",
                    graph,
                    "PyTorch sort top-k/top-p (eager)",
                    peer,
                )
            )
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}"
            print(f"(sampling: top-k/top-p in a CUDA graph failed: {why})")
            rows.append(Row(SECTION, case, f"(top-k/top-p in a CUDA graph failed: {why})", topkp))
    top_p = bench_us(lambda: k.sample(logits, temps, seeds, pos, top_p=TOP_P), **kw)
    peer = _try_us("PyTorch top-p", lambda: torch_top_k_top_p(logits, temps, None, TOP_P), fails, **kw)
    rows.append(
        Row(SECTION, case, f"us eager, top-p {TOP_P} (whole rows sorted)", top_p, "PyTorch sort top-p", peer)
    )
    return rows


# Streaming-pass launches timed: (chunk, warps per program, chunks each warp reads in turn,
# pipeline stages, persistent programs per SM or 0). Chunks of 2048 would need 64 entries per
# thread: they spill under the 64-register cap.
STREAM = (
    [(1024, warps, loop, 1, 0) for warps in (1, 2, 4) for loop in (1, 4)]
    + [(512, 4, 1, 1, 0), (512, 4, 4, 1, 0)]
    + [(1024, 1, 4, 2, 0), (1024, 4, 4, 2, 0), (1024, 1, 8, 3, 0)]
    + [(1024, 1, 1, 1, 32), (1024, 1, 1, 2, 16), (1024, 4, 1, 2, 8)]
)
FINISH = [(True, 2, 256), (True, 2, 128), (False, 2, 256), (False, 4, 256)]  # fused, warps, run


def _tuning_rows(k, B, V, device, bw_gbs) -> list[Row]:
    """The launch choices the default is picked from, each timed in a CUDA graph against the floor:
    the streaming pass alone for each launch in STREAM, then the whole sampler with the best of
    those, its finish step fused into the pass or a kernel of its own, and two run lengths. (Chunk
    and run length are part of the sampled arithmetic: other defaults would move a token only where
    its uniform lands within rounding of a boundary.)"""
    logits, temps, seeds, pos = _speed_inputs(B, V, torch.bfloat16, device)
    floor = _floor_us(logits, bw_gbs)
    timer = _graph_us if device == "cuda" else (lambda fn: bench_us(fn, warmup=1, reps=2))
    LaunchConfig = k.sampling.LaunchConfig

    def timed(config, finish):
        return timer(
            lambda: k.sampling._launch(logits, temps, seeds, pos, None, config=config, finish=finish)
        )

    rows, stats_us, whole_us = [], {}, {}
    case = f"tuning B={B} V={V} bf16"

    def row(label: str, us: float) -> Row:
        return Row(
            SECTION, f"{case}: {label}", "us CUDA graph (ratio: fraction of floor)", us, "floor us", floor
        )

    for chunk, warps, loop, stages, persistent in STREAM:
        config = LaunchConfig(
            chunk, warps, loop=loop, stages=stages, fused=not persistent, persistent=persistent
        )
        stats_us[config] = timed(config, False)
        how = f", {persistent} persistent programs per SM" if persistent else f" x {loop} chunks"
        rows.append(
            row(f"streaming pass, chunk {chunk}, {warps} warps{how}, {stages} stages", stats_us[config])
        )
    best = min(stats_us, key=stats_us.get)
    for fused, warps, run in FINISH:
        if fused and best.persistent:  # persistent programs finish in a kernel of its own
            continue
        config = best._replace(fused=fused, finish_warps=warps, run=run)
        whole_us[config] = timed(config, True)
        how = "finish fused" if fused else f"finish kernel of {warps} warps"
        rows.append(row(f"whole sampler, {tuple(config)}: {how}, runs of {run}", whole_us[config]))
    best = min(whole_us, key=whole_us.get)
    rows.append(
        Row(
            SECTION,
            f"{case}: fastest {tuple(best)} (default {tuple(k.sampling._default_config(V))})",
            "% of floor (CUDA graph)",
            100 * floor / whole_us[best],
        )
    )
    return rows


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------


def _oracle(logits, temps, tokens):
    """Float64 log-prob of tokens [B] and entropy [B] under logits / T (T <= 0: T = 1)."""
    x = logits.double()
    t = torch.where(temps > 0, temps, torch.ones_like(temps)).double()[:, None]
    z = (x - x.max(dim=1, keepdim=True).values) / t
    logp = torch.log_softmax(z, dim=1)
    ent = -torch.where(z > float("-inf"), logp.exp() * logp, 0.0).sum(1)
    return logp.gather(1, tokens.clamp(min=0)[:, None])[:, 0], ent


def _value_rows(k, B, V, dtype, device) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(7)
    logits = (torch.randn(B, V, device=device, generator=gen) * 4).to(dtype)
    logits[::7, ::3] = float("-inf")
    temps = torch.rand(B, device=device, generator=gen) * 2 + 0.05
    temps[::5] = 0.0
    temps[1] = 1e-3
    seeds, pos = torch.arange(B, device=device) * 13, torch.arange(B, device=device)
    out = k.sample(logits, temps, seeds, pos)
    ref = k.sample_ref(logits, temps, seeds, pos)
    case = f"B={B} V={V} {str(dtype).replace('torch.', '')}, masked, T in 0..2"
    same = (out.tokens == ref.tokens).double().mean().item()
    rows = [Row(SECTION, case, "tokens equal to sample_ref", same, "", None, ">= 0.98", same >= 0.98)]
    lp64, ent64 = _oracle(logits, temps, out.tokens)
    for name, got, want in (("logprob", out.logprobs, lp64), ("entropy", out.entropy, ent64)):
        err = (got.double() - want).abs()
        worst = (err / want.abs().clamp_min(1e-3)).max().item()
        ok = bool((err <= 1e-4 * want.abs() + 1e-7).all())
        rows.append(
            Row(SECTION, case, f"{name} max rel err vs fp64", worst, "", None, "<= 1e-4 (+1e-7 abs)", ok)
        )
    return rows


def _chi2_threshold(df: int, alpha: float = 1e-4) -> float:
    """Upper alpha-quantile of chi-square(df) by Wilson-Hilferty (scipy is not a dependency)."""
    z = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * alpha, dtype=torch.float64)).item()
    c = 2.0 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def _chi2_rows(k, n, device) -> list[Row]:
    V = 12
    row = torch.linspace(-3, 2, V, device=device)[torch.randperm(V, device=device)]
    rows = []
    for temp, top_k, top_p in ((0.8, None, None), (1.2, 5, 0.8)):
        out = k.sample(row[None].expand(n, V), temp, 4242, torch.arange(n, device=device), top_k, top_p)
        x = row.double().cpu()
        if top_k is not None:
            x = torch.where(x >= torch.sort(x, descending=True).values[top_k - 1], x, float("-inf"))
        probs = torch.softmax(x / temp, 0)
        if top_p is not None:
            ps, idx = torch.sort(probs, descending=True)
            keep = idx[(torch.cumsum(ps, 0) - ps) < top_p]
            x = torch.full_like(x, float("-inf")).index_copy(0, keep, x[keep])
            probs = torch.softmax(x / temp, 0)
        counts = torch.bincount(out.tokens.cpu(), minlength=V).double()
        live = probs * n >= 5
        stat = (((counts - probs * n) ** 2)[live] / (probs * n)[live]).sum().item()
        stray = int(counts[probs == 0].sum())
        df = int(live.sum()) - 1
        thr = _chi2_threshold(df)
        rows.append(
            Row(
                SECTION,
                f"chi-square V={V} T={temp} top_k={top_k} top_p={top_p}, {n} draws",
                "chi2 statistic",
                stat,
                "threshold (alpha 1e-4)",
                thr,
                "< threshold, no stray",
                stat < thr and stray == 0,
            )
        )
    return rows


def _far_tail_rows(k, V, gap, B, reps, device) -> list[Row]:
    """A token ``gap`` nats below the top (the rest 40 nats down) over B * reps draws."""
    row = torch.full((V,), -40.0, device=device)
    top, tail = 7, V - 10
    row[top], row[tail] = 0.0, -gap
    p = torch.softmax(row.double(), 0)[tail].item()
    logits = row.bfloat16()[None].expand(B, V)  # row stride 0: one row in memory
    pos = torch.arange(B, device=device)
    hits = sum(int((k.sample(logits, 1.0, r, pos).tokens == tail).sum()) for r in range(reps))
    n = B * reps
    expect, sd = n * p, math.sqrt(n * p * (1 - p))
    return [
        Row(
            SECTION,
            f"far tail: token {gap} nats below top, V={V}, {n} draws",
            "hits",
            hits,
            "expected",
            expect,
            "within 5 sd",
            abs(hits - expect) <= 5 * sd,
        )
    ]


# ----------------------------------------------------------------------------------------------


def rows(smoke: bool) -> list[Row]:
    k = _kernels()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bw = copy_bandwidth_gbs()
    compiled = None
    try:
        compiled = _compiled_race()
    except Exception as exc:  # torch.compile unavailable here: the other peers still run
        print(f"(sampling: torch.compile unavailable: {type(exc).__name__}: {exc})")
    out = [Row(SECTION, "device copy bandwidth", "GB/s (read + write)", bw)]
    if smoke:
        out += _speed_rows(k, 2, 1000, torch.bfloat16, device, bw, compiled, smoke)
        out += _value_rows(k, 4, 1000, torch.bfloat16, device)
        out += _chi2_rows(k, 120, device)
        out += _far_tail_rows(k, 64, 2.0, 100, 1, device)
        out += _tuning_rows(k, 2, 9000, device, bw)
        return out
    out += _value_rows(k, 64, V_FULL, torch.bfloat16, device)
    out += _value_rows(k, 32, V_FULL, torch.float32, device)
    out += _chi2_rows(k, 2_000_000, device)
    out += _far_tail_rows(k, V_FULL, 12.0, 1 << 20, 16, device)
    for B in (1, 16, 64, 256, 1024):
        out += _speed_rows(k, B, V_FULL, torch.bfloat16, device, bw, compiled, smoke)
        torch.cuda.empty_cache()
    for B in (256, 1024):
        out += _tuning_rows(k, B, V_FULL, device, bw)
    return out
