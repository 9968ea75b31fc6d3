"""The rollout engine: paged-KV generation on the live weights of a Hugging Face Llama-family model.

Low level (what the ARPO rollout drives): ``add`` a prompt, ``step`` a set of sequences (one forward
over all their pending tokens, prefills and decodes mixed, then the fused sampler), ``extend`` a
sequence with tokens the model did not write (a tool result), ``fork`` it into branches that share
its KV without copying, ``free`` it. ``prefill`` caches all pending tokens but the last, and
``logits`` runs the pending tokens and returns their logits without sampling. High level:
``generate`` (see ``generation.py``).

An ARPO branch point (``arpo_fast/rollout/tree.py``): ``extend(seq, tool_result)``, then ordinary
steps (the first computes the tool result's KV, once), and if the trajectory branches,
``fork(seq, n, at=len(prompt) + the response length right after the tool result)``: each child
holds the parent's first ``at`` tokens, shares the KV of all but the last of them (the parent's
blocks, not a copy) and re-runs that last one with its own seed to sample its own continuation.

When a step does not fit in the KV pool, ``EngineConfig.on_pool_exhausted`` picks between a
``PoolExhaustedError`` with nothing changed and preemption: the youngest sequences give up their KV
and recompute it (prompt and generated tokens alike) when they next run; their sampled tokens are
the same as without preemption, since sampling depends only on (seed, position) and the logits.

Sampling is reproducible and independent of the batch: row i samples with its sequence's seed at
position ``len(tokens)``; forked children get seeds hashed from (parent seed, child index).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

from arpo_fast.engine.kv_cache import PagedKVCache
from arpo_fast.engine.model import PagedModel
from arpo_fast.engine.params import EngineConfig, SamplingParams
from arpo_fast.engine.sequence import SeqState, build_batch
from arpo_fast.errors import PoolExhaustedError, UnknownSequenceError
from arpo_fast.kernels import sample
from arpo_fast.seeds import MAX_SEED, child_seed


class StepOutput(NamedTuple):
    """Per input sequence, in order. tokens: int64 [B] (CPU); logprobs, entropy: fp32 [B] on the
    model's device; ran: bool [B] (CPU), False where preemption deferred the sequence to a later
    step (its token is -1 and its log-prob and entropy NaN). top_entropy: fp32 [B] on the model's
    device when asked for (``step(..., top_entropy=...)``), else None."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    ran: torch.Tensor
    top_entropy: Optional[torch.Tensor] = None


def _truncates(p: SamplingParams) -> bool:
    """Whether a sequence's top-k/top-p can drop tokens (top_k 0 and top_p 1.0 keep them all)."""
    return p.top_k > 0 or p.top_p < 1


def _sampler_arg(values: list, off, dtype: torch.dtype, device: torch.device):
    """One top-k or top-p setting of every row as ``sample`` takes it: None when every row has it
    off (the one-pass path), the number when all rows share it (top-k then selects k candidates
    per row instead of sorting whole rows), else a per-row tensor [B]."""
    if all(v == off for v in values):
        return None
    if len(set(values)) == 1:
        return values[0]
    return torch.tensor(values, dtype=dtype).to(device)


class Engine:
    """Generation engine over a ``transformers`` Llama / Qwen2 / Qwen3 causal LM (its parameters are
    used in place). Extra keyword arguments go to ``EngineConfig``; ``tokenizer`` (anything with
    ``decode(list[int]) -> str``) is needed for stop strings, and where ``len(tokenizer)`` is
    below the output layer's rows (Qwen2.5: 151,665 ids, 151,936 rows) ids past it are never
    sampled, as vLLM's ``allowed_token_ids`` does for the reference: the sampler's log-probs and
    entropies (the top-10 one too) are those of the distribution over the tokenizer's ids."""

    def __init__(
        self,
        model: torch.nn.Module,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_memory: int | None = None,
        tokenizer=None,
        **config,
    ):
        self.config = EngineConfig(
            block_size=block_size, num_blocks=num_blocks, kv_memory=kv_memory, **config
        )
        self.model = PagedModel(model)
        self.hf_config = model.config
        self.tokenizer = tokenizer
        self.vocab_limit = _vocab_limit(self.model.vocab_size, tokenizer)
        m = self.model
        if self.config.cuda_graphs and m.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a model on a CUDA device, not {m.device}")
        if self.config.cuda_graphs is None:
            self.config.cuda_graphs = m.device.type == "cuda"
        # With graphs, one extra block is the padding rows' trash block (see cuda_graphs.py).
        extra = 1 if self.config.cuda_graphs else 0
        self.cache = PagedKVCache(
            m.num_layers,
            self._pool_blocks() + extra,
            self.config.block_size,
            m.num_kv_heads,
            m.head_dim,
            m.dtype,
            m.device,
            self.config.forker,
        )
        self._graphs = self._make_graphs() if self.config.cuda_graphs else None
        self._seqs: dict[int, SeqState] = {}
        self._next_id = 0
        self._arrivals = 0
        self.eos_token_ids = _eos_ids(model)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "steps": 0}

    def _make_graphs(self):
        from arpo_fast.engine.cuda_graphs import TRASH_BLOCK, DecodeGraphs

        trash = self.cache.new_sequence()  # never freed: it pins the trash block
        self.cache.forker.append(trash, self.config.block_size)
        assert int(self.cache.forker.block_table(trash)[0]) == TRASH_BLOCK
        cfg = self.config
        max_len = cfg.max_seq_len or int(getattr(self.hf_config, "max_position_embeddings", 32768))
        width = -(-max_len // cfg.block_size)
        return DecodeGraphs(self.model, self.cache, cfg.max_graph_batch, width, self.vocab_limit)

    def _pool_blocks(self) -> int:
        cfg, per_block = self.config, self.model.kv_bytes_per_block(self.config.block_size)
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        if cfg.kv_memory is not None:
            budget = cfg.kv_memory
        elif self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            # Memory this process's caching allocator holds but does not use is free to us too.
            cached = torch.cuda.memory_reserved(self.model.device) - torch.cuda.memory_allocated(
                self.model.device
            )
            budget = int((free + cached) * cfg.gpu_memory_fraction)
        else:
            budget = cfg.cpu_kv_memory
        blocks = min(budget // per_block, 2**31 - 1)
        if blocks < 1:
            raise ValueError(
                f"a KV budget of {budget} bytes holds no block of {per_block} bytes "
                f"(block_size {cfg.block_size})"
            )
        return blocks

    # ------------------------------------------------------------------ validation helpers
    def _get(self, seq: int) -> SeqState:
        state = self._seqs.get(seq) if isinstance(seq, int) else None
        if state is None:
            raise UnknownSequenceError(f"unknown sequence {seq!r} (never added, or already freed)")
        return state

    def _check_tokens(self, token_ids: Sequence[int], what: str) -> list[int]:
        try:
            ids = [operator.index(t) for t in token_ids]  # ints only: 1.5 is an error, not 1
        except TypeError as exc:
            raise ValueError(f"{what}: token ids must be integers ({exc})") from None
        if not ids:
            raise ValueError(f"{what}: empty token list")
        V = self.model.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"{what}: token ids outside the vocabulary [0, {V}): {bad[:5]}")
        return ids

    # ------------------------------------------------------------------ low-level API
    def add(self, prompt_ids: Sequence[int], seed: int = 0) -> int:
        """Start a sequence holding ``prompt_ids`` (pending until the next step); returns its id."""
        ids = self._check_tokens(prompt_ids, "add")
        if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"add: seed must be an int in [0, 2^63), got {seed!r}")
        return self._new_state(SeqState(seed, ids, 0, self.cache.new_sequence()))

    def _new_state(self, state: SeqState) -> int:
        state.order = self._arrivals
        self._arrivals += 1
        seq, self._next_id = self._next_id, self._next_id + 1
        self._seqs[seq] = state
        return seq

    def extend(self, seq: int, token_ids: Sequence[int]) -> None:
        """Append tokens the model did not write (a tool result); they run in the next step."""
        state = self._get(seq)
        state.tokens.extend(self._check_tokens(token_ids, "extend"))

    def fork(self, seq: int, n: int, at: int | None = None) -> list[int]:
        """``n`` children holding the first ``at`` tokens of ``seq`` (default: all of them), sharing
        its KV blocks without copying. A child whose prefix is fully cached re-runs its last token
        (one token of compute) so that it has a position to sample from."""
        state = self._get(seq)
        total = len(state.tokens)
        at = total if at is None else at
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"fork: n must be an int >= 0, got {n!r}")
        if not isinstance(at, int) or not 1 <= at <= total:
            raise ValueError(f"fork: at must be in [1, {total}] for sequence {seq}, got {at!r}")
        share = min(at, state.computed)
        if share == at:
            share -= 1
        kv = self.cache.fork(state.kv, n, share) if state.kv is not None else [None] * n
        children = []
        for j in range(n):
            child = SeqState(
                child_seed(state.seed, state.forks + j),
                state.tokens[:at],
                0,
                kv[j],
                share if kv[j] is not None else 0,
            )
            children.append(self._new_state(child))
        state.forks += n
        return children

    def free(self, seq: int) -> None:
        """Release a sequence and its KV blocks (blocks shared with others stay)."""
        state = self._get(seq)
        del self._seqs[seq]
        if state.kv is not None:
            self.cache.free(state.kv)

    def tokens(self, seq: int) -> list[int]:
        """All tokens of a sequence: prompt, sampled and extended (a copy)."""
        return list(self._get(seq).tokens)

    def live(self) -> list[int]:
        """Ids of the sequences not yet freed."""
        return list(self._seqs)

    def length(self, seq: int) -> int:
        return len(self._get(seq).tokens)

    @property
    def vocab_size(self) -> int:
        """V: the size of the distributions ``step`` samples from (the tokenizer's, where it is
        below the output layer's)."""
        return self.vocab_limit or self.model.vocab_size

    @property
    def free_blocks(self) -> int:
        return self.cache.free_blocks()

    # ------------------------------------------------------------------ steps
    def _states(self, seqs: Sequence[int], what: str) -> list[SeqState]:
        seqs = list(seqs)
        states = [self._get(s) for s in seqs]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"{what}: a sequence appears twice in the batch")
        idle = [s for s, st in zip(seqs, states) if st.pending == 0]
        if idle:
            raise ValueError(f"{what}: sequences {idle[:5]} have no pending tokens (extend them first)")
        return states

    def _preempt(self, state: SeqState) -> None:
        self.cache.free(state.kv)
        state.kv, state.computed = None, 0
        self.stats["preemptions"] += 1

    def _reserve(self, states: list[SeqState], preempt: bool):
        """Reserve KV slots for every pending token of ``states``; returns (running states, step
        tensors). Under "preempt" the youngest sequences are evicted until the step fits: others
        first, then members of this step (which are deferred), never the last one left."""
        running = list(states)
        while True:
            for s in running:
                if s.kv is None:
                    s.kv = self.cache.new_sequence()
            try:
                meta = self.cache.prepare_step([s.kv for s in running], [s.pending for s in running])
                return running, meta
            except PoolExhaustedError:
                if not preempt:
                    raise
                victim = self._victim(running)
                if victim is None:
                    raise
                running = [s for s in running if s is not victim]
                self._preempt(victim)

    def _victim(self, running: list[SeqState]) -> SeqState | None:
        ids = {id(s) for s in running}
        others = [s for s in self._seqs.values() if id(s) not in ids and s.kv is not None and s.computed > 0]
        if others:
            return max(others, key=lambda s: s.order)
        if len(running) > 1:
            return max(running, key=lambda s: s.order)
        return None

    def _execute(self, running: list[SeqState], fn):
        """Run ``fn`` (the step's compute) for sequences whose slots are reserved; on failure give the
        slots back, so the step never happened. Then their pending tokens count as computed."""
        before = [(s, s.computed) for s in running]
        try:
            result = fn()
        except BaseException:
            for s, computed in before:
                self.cache.truncate(s.kv, computed)
            raise
        for s in running:
            self.stats["prefill_tokens" if s.pending > 1 else "decode_tokens"] += s.pending
            s.computed = len(s.tokens)
        self.stats["steps"] += 1
        return result

    def logits(self, seqs: Sequence[int], all_positions: bool = False) -> torch.Tensor | list:
        """Run the pending tokens of ``seqs`` and return fp32 logits: [B, vocab] at each sequence's
        last token, or with ``all_positions`` a list of [pending_b, vocab]. Nothing is sampled, so
        the sequences have no pending token afterwards (``extend`` one before stepping them).
        Raises PoolExhaustedError if the pool cannot hold the step, whatever the setting."""
        states = self._states(seqs, "logits")
        counts = [s.pending for s in states]
        running, meta = self._reserve(states, preempt=False)
        batch = build_batch(running, meta, self.model.device, all_positions)
        logits = self._execute(running, lambda: self.model.forward(self.cache, batch)).float()
        return list(logits.split(counts)) if all_positions else logits

    def prefill(self, seqs: Sequence[int]) -> None:
        """Cache the KV of every pending token but the last (sequences with one pending token are
        skipped). Before a fork this makes the children share the whole prefix: each then runs just
        the last token, with its own seed, instead of each re-running a tool result. Raises
        PoolExhaustedError if the pool cannot hold it, whatever the setting."""
        states = [s for s in self._states(seqs, "prefill") if s.pending > 1]
        if not states:
            return
        held = [s.tokens.pop() for s in states]  # hidden from the step, restored below
        try:
            running, meta = self._reserve(states, preempt=False)
            batch = build_batch(running, meta, self.model.device, all_positions=False)
            self._execute(running, lambda: self.model.forward(self.cache, batch))
        finally:
            for s, t in zip(states, held):
                s.tokens.append(t)

    def step(
        self,
        seqs: Sequence[int],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        top_entropy: Sequence[bool] | None = None,
    ) -> StepOutput:
        """One forward over all pending tokens of ``seqs``, then one sampled token per sequence,
        which becomes that sequence's pending token. ``params``: one for all, or one per sequence
        (only temperature, top_k and top_p matter here). ``top_entropy``: per sequence, whether to
        also return the entropy over its ``TOP_ENTROPY_K`` most likely tokens (the reference's
        estimate: -sum p log p over the 10 largest probabilities of the temperature-scaled
        distribution, p normalised over the whole vocabulary, and over the sampled token too when
        it is not among them, as vLLM returns it)."""
        states = self._states(seqs, "step")
        params = SamplingParams() if params is None else params
        per_row = [params] * len(states) if isinstance(params, SamplingParams) else list(params)
        if len(per_row) != len(states):
            raise ValueError(f"step: {len(per_row)} SamplingParams for {len(states)} sequences")
        running, meta = self._reserve(states, self.config.on_pool_exhausted == "preempt")
        index = {id(s): i for i, s in enumerate(states)}
        rows = [index[id(s)] for s in running]
        run_params = [per_row[i] for i in rows]
        wanted = _rows_wanted(top_entropy, rows, len(states))
        out, top = self._execute(running, lambda: self._compute_step(running, meta, run_params, wanted))
        tokens = out.tokens.tolist()  # the step's one host sync
        bad = [i for i, t in zip(rows, tokens) if t < 0]
        for s, t in zip(running, tokens):
            if t >= 0:
                s.tokens.append(t)
        if bad:
            raise FloatingPointError(
                f"step: non-finite logits for batch rows {bad[:5]}; their KV "
                "is kept but no token was appended"
            )
        return self._scatter(len(states), rows, out, top)

    def _compute_step(
        self, running: list[SeqState], meta, params: list[SamplingParams], wanted: list[int] | None
    ):
        """Forward and sample, and the top-10 entropy of the ``wanted`` running rows; a plain
        decode step replays a CUDA graph when they are enabled."""
        dev = self.model.device
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(dev)
        seeds = torch.tensor([s.seed for s in running], dtype=torch.int64).to(dev)
        positions = torch.tensor([len(s.tokens) for s in running], dtype=torch.int64).to(dev)
        if self._graph_eligible(running, meta, params):
            tokens = torch.tensor([s.tokens[-1] for s in running], dtype=torch.int64).to(dev)
            out, logits = self._graphs.run(tokens, positions - 1, meta, temp, seeds, positions)
        else:
            batch = build_batch(running, meta, dev, all_positions=False)
            logits = self.model.forward(self.cache, batch)
            out = self._sample(logits, params, temp, seeds, positions, self.vocab_limit)
        if wanted is None:
            return out, None
        return out, _top_entropy(logits[:, : self.vocab_limit], temp, wanted, out.tokens)

    def _graph_eligible(self, running, meta, params) -> bool:
        if self._graphs is None or not self._graphs.fits(len(running), meta.block_tables.shape[1]):
            return False
        if any(s.pending != 1 for s in running):
            return False
        if any(_truncates(p) for p in params):
            return False
        if not self._graphs.graphs:
            try:
                self._graphs.capture()
            except Exception as exc:  # noqa: BLE001 - a failed capture costs speed, never the rollout
                warnings.warn(f"CUDA graph capture failed ({exc!r}); decoding eagerly", stacklevel=2)
                self._graphs = None
                return False
        return True

    @staticmethod
    def _sample(logits, params, temp, seeds, positions, vocab_limit=None):
        top_k = _sampler_arg([p.top_k for p in params], 0, torch.int64, logits.device)
        top_p = _sampler_arg([p.top_p for p in params], 1.0, torch.float32, logits.device)
        return sample(logits, temp, seeds, positions, top_k, top_p, vocab_limit=vocab_limit)

    @staticmethod
    def _scatter(B: int, rows: list[int], out, top: torch.Tensor | None) -> StepOutput:
        if len(rows) == B:
            return StepOutput(
                out.tokens.cpu(), out.logprobs, out.entropy, torch.ones(B, dtype=torch.bool), top
            )
        dev = out.logprobs.device
        idx = torch.tensor(rows, dtype=torch.int64)
        tokens = torch.full((B,), -1, dtype=torch.int64).index_copy_(0, idx, out.tokens.cpu())
        nan = torch.full((B,), float("nan"), device=dev)
        ran = torch.zeros(B, dtype=torch.bool).index_fill_(0, idx, True)
        top = None if top is None else nan.index_copy(0, idx.to(dev), top)
        return StepOutput(
            tokens,
            nan.index_copy(0, idx.to(dev), out.logprobs),
            nan.index_copy(0, idx.to(dev), out.entropy),
            ran,
            top,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        seeds: Sequence[int] | None = None,
    ):
        """Complete every prompt; returns one ``Completion`` per prompt (see ``generation.py``)."""
        from arpo_fast.engine.generation import generate

        return generate(self, prompts, SamplingParams() if params is None else params, seeds)


TOP_ENTROPY_K = 10
"""How many of a distribution's most likely tokens the reference's entropy estimate covers."""


def _rows_wanted(top_entropy: Sequence[bool] | None, rows: list[int], B: int) -> list[int] | None:
    """Positions among the running ``rows`` whose top-k entropy was asked for (None: not asked)."""
    if top_entropy is None:
        return None
    if len(top_entropy) != B:
        raise ValueError(f"step: {len(top_entropy)} top_entropy flags for {B} sequences")
    return [r for r, i in enumerate(rows) if top_entropy[i]]


def _top_entropy(
    logits: torch.Tensor, temp: torch.Tensor, wanted: list[int], tokens: torch.Tensor
) -> torch.Tensor:
    """fp32 [B]: -sum p log p over the TOP_ENTROPY_K largest probabilities of each wanted row of
    ``logits`` at its temperature (greedy rows at 1), NaN elsewhere; a row's sampled token
    (``tokens``, int64 [B]) counts as one more term when it is not among them: vLLM's log-probs of
    a step, which the reference sums, hold the top k and the sampled token (k + 1 entries when it
    is outside the top k). Only the wanted rows are read."""
    idx = torch.tensor(wanted, dtype=torch.int64, device=logits.device)
    t = temp.index_select(0, idx)
    z = logits.index_select(0, idx).float() / torch.where(t > 0, t, torch.ones_like(t))[:, None]
    logp = z - z.logsumexp(dim=1, keepdim=True)
    top, top_ids = logp.topk(min(TOP_ENTROPY_K, z.shape[1]), dim=1)
    tok = tokens.to(logits.device).index_select(0, idx)
    outside = (tok >= 0) & (top_ids != tok[:, None]).all(dim=1)
    tok_lp = logp.gather(1, tok.clamp(min=0)[:, None])[:, 0]
    h = -(top.exp() * top).sum(dim=1) - torch.where(outside, tok_lp.exp() * tok_lp, 0.0)
    out = torch.full((logits.shape[0],), float("nan"), dtype=torch.float32, device=logits.device)
    return out.index_copy_(0, idx, h)


def _vocab_limit(rows: int, tokenizer) -> int | None:
    """len(tokenizer) where it is below the output layer's ``rows``; else None (no tokenizer, one
    without a length, or one as large as the layer: nothing to mask)."""
    try:
        size = len(tokenizer)
    except TypeError:
        return None
    return size if 0 < size < rows else None


def _eos_ids(model) -> frozenset:
    ids = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return frozenset(int(t) for t in ids)
