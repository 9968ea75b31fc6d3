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

A step is the scheduler's (``scheduler.py``: the KV slots of its tokens, and preemption when the
pool cannot hold them, per ``EngineConfig.on_pool_exhausted``), then the runner's (``runner.py``:
the forward, a CUDA graph replay for plain decode steps, and the fused sampler).

Sampling is reproducible and independent of the batch: row i samples with its sequence's seed at
position ``len(tokens)``; forked children get seeds hashed from (parent seed, child index).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from arpo_fast.engine.kv_cache import PagedKVCache
from arpo_fast.engine.model import PagedModel
from arpo_fast.engine.params import EngineConfig, SamplingParams
from arpo_fast.engine.runner import StepOutput, StepRunner, rows_wanted, scatter
from arpo_fast.engine.scheduler import Scheduler
from arpo_fast.engine.sequence import SeqState, build_batch
from arpo_fast.errors import UnknownSequenceError
from arpo_fast.seeds import MAX_SEED, child_seed


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
        graphs = self._make_graphs() if self.config.cuda_graphs else None
        self.runner = StepRunner(m, self.cache, graphs, self.vocab_limit)
        self._seqs: dict[int, SeqState] = {}
        self._next_id = 0
        self._arrivals = 0
        self.eos_token_ids = _eos_ids(model)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "steps": 0}
        self.scheduler = Scheduler(self.cache, self._seqs, self.stats)

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
        if self.released:
            raise RuntimeError("add: the KV pool is released; reacquire() it first")
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

    # ------------------------------------------------------------------ the pool's memory
    @property
    def released(self) -> bool:
        return self.cache.released

    def release(self) -> None:
        """Give the KV pool's memory back to torch's allocator between rollouts (the trainer's
        update reuses it) until :meth:`reacquire`. Every sequence must be freed first: their KV
        would be lost."""
        if self._seqs:
            raise RuntimeError(f"release: {len(self._seqs)} sequences still hold KV; free them first")
        self.cache.release()

    def reacquire(self) -> None:
        """Take the KV pool's memory back. Captured decode graphs read the pool and the weights by
        address: if either moved, they are captured again at the next plain decode step."""
        self.cache.reacquire()
        graphs = self.runner.graphs
        if graphs is not None:
            graphs.drop_if_moved()

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

    def logits(self, seqs: Sequence[int], all_positions: bool = False) -> torch.Tensor | list:
        """Run the pending tokens of ``seqs`` and return fp32 logits: [B, vocab] at each sequence's
        last token, or with ``all_positions`` a list of [pending_b, vocab]. Nothing is sampled, so
        the sequences have no pending token afterwards (``extend`` one before stepping them).
        Raises PoolExhaustedError if the pool cannot hold the step, whatever the setting."""
        states = self._states(seqs, "logits")
        counts = [s.pending for s in states]
        running, meta = self.scheduler.reserve(states, preempt=False)
        batch = build_batch(running, meta, self.model.device, all_positions)
        logits = self.scheduler.execute(running, lambda: self.model.forward(self.cache, batch)).float()
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
            running, meta = self.scheduler.reserve(states, preempt=False)
            batch = build_batch(running, meta, self.model.device, all_positions=False)
            self.scheduler.execute(running, lambda: self.model.forward(self.cache, batch))
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
        also return the entropy over its ``runner.TOP_ENTROPY_K`` most likely tokens (the reference's
        estimate: -sum p log p over the 10 largest probabilities of the temperature-scaled
        distribution, p normalised over the whole vocabulary, and over the sampled token too when
        it is not among them, as vLLM returns it)."""
        states = self._states(seqs, "step")
        per_row = _per_row(params, len(states))
        running, meta = self.scheduler.reserve(states, self.config.on_pool_exhausted == "preempt")
        index = {id(s): i for i, s in enumerate(states)}
        rows = [index[id(s)] for s in running]
        wanted = rows_wanted(top_entropy, rows, len(states))
        step = lambda: self.runner.run(running, meta, [per_row[i] for i in rows], wanted)
        out, top = self.scheduler.execute(running, step)
        _append_sampled(running, rows, out.tokens.tolist())  # the step's one host sync
        return scatter(len(states), rows, out, top)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        seeds: Sequence[int] | None = None,
    ):
        """Complete every prompt; returns one ``Completion`` per prompt (see ``generation.py``)."""
        from arpo_fast.engine.generation import generate

        return generate(self, prompts, SamplingParams() if params is None else params, seeds)


def _vocab_limit(rows: int, tokenizer) -> int | None:
    """len(tokenizer) where it is below the output layer's ``rows``; else None (no tokenizer, one
    without a length, or one as large as the layer: nothing to mask)."""
    try:
        size = len(tokenizer)
    except TypeError:
        return None
    return size if 0 < size < rows else None


def _eos_ids(model) -> frozenset:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return frozenset(int(t) for t in ids)


def _per_row(params: SamplingParams | Sequence[SamplingParams] | None, B: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per sequence of a step."""
    params = SamplingParams() if params is None else params
    per_row = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != B:
        raise ValueError(f"step: {len(per_row)} SamplingParams for {B} sequences")
    return per_row


def _append_sampled(running: list[SeqState], rows: list[int], tokens: list[int]) -> None:
    """Each running sequence's sampled token becomes its pending token; a row of non-finite
    logits (token -1) keeps its KV but gets no token, and the step fails naming it."""
    bad = [i for i, t in zip(rows, tokens) if t < 0]
    for s, t in zip(running, tokens):
        if t >= 0:
            s.tokens.append(t)
    if bad:
        raise FloatingPointError(
            f"step: non-finite logits for batch rows {bad[:5]}; their KV is kept but no token was appended"
        )
