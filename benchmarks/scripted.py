"""A workload that makes tool calls: the paged engine's real forward and sampler, with each token
picked from a seeded script, and tools that sleep according to named latency distributions.

``bench_schedule.py`` needs trajectories with 1-4 tool calls each, search and python mixed, on a
tiny model. A random (or briefly trained) tiny model does not write such calls reliably, so
:class:`ScriptedPolicy` stands in for the sampling decision only: every ``step`` runs the engine's
forward over the sequences' pending tokens (prompts, tool results, the last token) and the fused
sampler over the logits, exactly the compute of ``Engine.step``; then, instead of the sampled
token, the sequence's script supplies the next token, which is appended and runs in the next step.
The entropies the rollout's branch rule reads are the model's, computed on the script's text.

A script is a function of a key: the engine seed hashed for a started sequence, and the parent's
key and fork index for a branch, so a branch writes its own continuation from the fork point. Call
bodies are unique per (key, call), and a tool's latency and output are functions of its input:
the same trees see the same tool behaviour under any schedule.
"""

from __future__ import annotations

import math
import random
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch

from arpo_fast.engine import Engine, StepOutput
from arpo_fast.engine.params import SamplingParams
from arpo_fast.kernels import sample
from arpo_fast.rollout.tools.base import ToolResult
from arpo_fast.seeds import child_seed

Z99 = 2.3263478740408408  # the standard normal's 99th percentile


@dataclass(frozen=True)
class Lognormal:
    """Latency in seconds: lognormal with the given median and 99th percentile."""

    median: float
    p99: float

    @property
    def sigma(self) -> float:
        return math.log(self.p99 / self.median) / Z99

    @property
    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)

    def draw(self, u: float) -> float:
        """The quantile at u in (0, 1)."""
        return self.median * math.exp(self.sigma * _probit(u))


def _probit(u: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(min(max(u, 1e-12), 1 - 1e-12))


LATENCY = {
    "search": Lognormal(median=1.0, p99=8.0),
    "python": Lognormal(median=0.2, p99=3.0),
}
"""Named latency distributions: a web search (about a second, a heavy tail) and a python call."""


class SleepingTool:
    """A tool that answers after a latency drawn from ``LATENCY[name]`` with a uniform that is a
    function of (seed, input), and records when each call ran (for the busy fractions)."""

    def __init__(self, name: str, seed: int = 0, scale: float = 1.0):
        self.name, self.seed, self.scale = name, seed, scale
        self.intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def latency(self, query: str) -> float:
        h = zlib.crc32(f"{self.seed}:{self.name}:{query}".encode())
        return self.scale * LATENCY[self.name].draw((h + 0.5) / 2**32)

    def __call__(self, query: str) -> ToolResult:
        start = time.perf_counter()
        time.sleep(self.latency(query))
        with self._lock:
            self.intervals.append((start, time.perf_counter()))
        return ToolResult(_answer(self.name, query))


def _answer(name: str, query: str) -> str:
    if name == "python":
        return f"{zlib.crc32(query.encode()) % 100000}\n"
    rng = random.Random(query)
    pages = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(3)]
    return "\n".join(f"Page {i + 1}: {p}" for i, p in enumerate(pages))


WORDS = "the of a tool call result value number sum list term fact page line step check so then next".split()


@dataclass
class _Seq:
    key: int
    prompt: int
    length: int  # tokens held: prompt + response
    prompt_len: int
    pending: int  # tokens the next forward runs (mirrors the engine's count; used for grouping)
    result_ends: list[int] = field(default_factory=list)  # response lengths right after each result
    forks: int = 0


class ScriptedPolicy:
    """An ``arpo_rollout`` engine: ``Engine``'s forward and sampler, tokens from a seeded script.

    Scripts: 1-4 segments, each ``think`` tokens (12-40) then a search or python call, and a last
    segment of 8-24 tokens and ``<answer>\\boxed{...}</answer>`` then EOS. A sequence writes segment
    r after r tool results (a branch that already has more results than its script's calls goes
    straight to the last one). Records per-step busy time and when each prompt's last sequence was
    freed."""

    def __init__(self, engine: Engine, tokenizer, prompts: list[list[int]]):
        self.engine, self.tok = engine, tokenizer
        self.eos = tokenizer.eos_token_id
        self.prompt_of = {tuple(p): i for i, p in enumerate(prompts)}
        self.plain = _plain_tokens(tokenizer)
        self.seqs: dict[int, _Seq] = {}
        self.plans: dict[int, list[list[int]]] = {}
        self.busy_s, self.steps, self.forwards, self.start = 0.0, 0, 0, time.perf_counter()
        self.done_at = [0.0] * len(prompts)

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def add(self, prompt_ids, seed: int = 0) -> int:
        seq = self.engine.add(prompt_ids, seed)
        n = len(prompt_ids)
        self.seqs[seq] = _Seq(child_seed(seed, 1 << 41), self.prompt_of[tuple(prompt_ids)], n, n, n)
        return seq

    def extend(self, seq: int, token_ids) -> None:
        self.engine.extend(seq, token_ids)
        s = self.seqs[seq]
        s.length += len(token_ids)
        s.pending += len(token_ids)
        s.result_ends.append(s.length - s.prompt_len)

    def fork(self, seq: int, n: int, at: int | None = None) -> list[int]:
        children = self.engine.fork(seq, n, at)
        s = self.seqs[seq]
        at = s.length if at is None else at
        shared = min(at, s.length - s.pending)  # as the engine shares a fully cached prefix but
        shared -= shared == at  # its last token, which the child runs again
        for child in children:
            s.forks += 1
            ends = [e for e in s.result_ends if e <= at - s.prompt_len]
            key = child_seed(s.key, s.forks)
            self.seqs[child] = _Seq(key, s.prompt, at, s.prompt_len, at - shared, ends)
        return children

    def free(self, seq: int) -> None:
        self.engine.free(seq)
        s = self.seqs.pop(seq)
        self.done_at[s.prompt] = max(self.done_at[s.prompt], time.perf_counter() - self.start)

    def step(self, seqs, params: SamplingParams | None = None, top_entropy=None) -> StepOutput:
        if top_entropy is not None:
            raise ValueError("ScriptedPolicy: the top-10 entropy (reference semantics) is not supported")
        params = params or SamplingParams()
        t0 = time.perf_counter()
        logits = self._logits(list(seqs))
        states = [self.seqs[s] for s in seqs]
        temp = torch.full((len(seqs),), params.temperature)
        keys = torch.tensor([s.key for s in states])
        positions = torch.tensor([s.length for s in states])
        out = sample(logits, temp, keys, positions)  # the sampler's cost and the model's entropy
        tokens = torch.tensor([self._next(s) for s in states])
        scaled = logits / max(params.temperature, 1e-6)
        logprobs = scaled.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        for seq, s, token in zip(seqs, states, tokens.tolist()):
            self.engine.extend(seq, [token])
            s.length, s.pending = s.length + 1, 1
        self.busy_s += time.perf_counter() - t0
        self.steps += 1
        return StepOutput(tokens, logprobs, out.entropy, torch.ones(len(seqs), dtype=torch.bool))

    def _logits(self, seqs: list[int]) -> torch.Tensor:
        """The step's forward, in two groups: sequences with one pending token, and those with
        more (a prompt, a tool result). On the CPU the engine's attention reference pads every
        sequence's queries to the longest in the batch, so one 60-token result in a batch of 500
        decodes would cost 60 decode steps; the GPU kernel pays only for real tokens, and so does
        this split (one more forward where a step mixes the two)."""
        pending = [self.seqs[s].pending for s in seqs]
        groups = [[i for i, n in enumerate(pending) if n == 1], [i for i, n in enumerate(pending) if n > 1]]
        logits = torch.empty(len(seqs), self.vocab_size)
        for rows in groups:
            if rows:
                logits[rows] = self.engine.logits([seqs[i] for i in rows])
                self.forwards += 1
        return logits

    def _next(self, s: _Seq) -> int:
        plan = self.plans.get(s.key)
        if plan is None:
            plan = self.plans[s.key] = self._plan(s.key)
        r = min(len(s.result_ends), len(plan) - 1)
        offset = s.length - s.prompt_len - (s.result_ends[-1] if s.result_ends else 0)
        return plan[r][offset] if offset < len(plan[r]) else self.eos

    def _plan(self, key: int) -> list[list[int]]:
        rng = random.Random(key)
        segments = []
        for i in range(rng.randint(1, 4)):
            think = [rng.choice(self.plain) for _ in range(rng.randint(12, 40))]
            segments.append(think + self._encode(_call_text(rng, key, i)))
        think = [rng.choice(self.plain) for _ in range(rng.randint(8, 24))]
        answer = f"<answer>\\boxed{{{rng.randint(0, 99)}}}</answer>"
        segments.append(think + self._encode(answer) + [self.eos])
        return segments

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))


def _call_text(rng: random.Random, key: int, i: int) -> str:
    """Call ``i`` of the script with key ``key``: a search or a python call, its body unique."""
    tag = f"{key % 10**9} {i}"
    if rng.random() < 0.5:
        return f"<search>{' '.join(rng.choice(WORDS) for _ in range(3))} {tag}</search>"
    return f"<python>print({rng.randint(100, 999)} * {rng.randint(100, 999)})  # {tag}</python>"


def _plain_tokens(tok) -> list[int]:
    """Token ids that decode to letters, digits and spaces only (no tag can form from them)."""
    special = set(tok.all_special_ids)
    ids = []
    for i in range(len(tok)):
        text = tok.decode([i])
        if i not in special and text.strip() and all(c.isalnum() or c == " " for c in text):
            ids.append(i)
    return ids
