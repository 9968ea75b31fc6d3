"""Configuration dataclasses of the rollout engine: how to sample, and how to size the KV pool."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How ``Engine.step`` and ``Engine.generate`` pick tokens and when ``generate`` stops.

    The token that triggers a stop (EOS, a stop token id, or the token that completes a stop string)
    is kept in the output, so a tool-call tag stays part of the trajectory.
    """

    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all (as the trainer's ``--top-k 0``)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose mass reaches p, in (0, 1]; 1.0 keeps all (as the
    trainer's ``--top-p 1.0``)."""
    max_new_tokens: int = 256
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    """Extra stop tokens besides EOS."""
    stop: Sequence[str] = field(default_factory=tuple)
    """Stop strings, matched on the decoded new text (needs the engine's tokenizer)."""
    ignore_eos: bool = False

    def __post_init__(self):
        if math.isnan(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1.0: off), got {self.top_p!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)


@dataclass
class EngineConfig:
    """KV pool and engine settings. The pool size comes from, first that is set: ``num_blocks``,
    ``kv_memory`` (bytes), or on CUDA ``gpu_memory_fraction`` of the free device memory; on the CPU
    with neither set, ``cpu_kv_memory`` bytes."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_memory: int | None = None
    gpu_memory_fraction: float = 0.5
    cpu_kv_memory: int = 256 << 20
    on_pool_exhausted: str = "raise"
    """"raise": PoolExhaustedError, nothing changed. "preempt": free the KV of the youngest
    sequences and recompute it when they next step (results are the same as without preemption)."""
    forker: str = "native"
    """"native" (C++) or "python" (the reference forker)."""
    max_prefill_tokens: int = 32768
    """``generate`` prefills prompts in groups of at most this many tokens (a longer prompt alone)."""
    cuda_graphs: bool | None = None
    """Replay decode steps from CUDA graphs (see ``cuda_graphs.py``). None: on for a model on a CUDA
    device (the steps are captured at the first plain decode step), off elsewhere; True needs CUDA."""
    max_graph_batch: int = 256
    """Largest decode batch captured; bigger batches run eagerly."""
    max_seq_len: int | None = None
    """Longest sequence a captured step serves; default the model's max_position_embeddings."""

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_memory is not None and self.kv_memory <= 0:
            raise ValueError(f"kv_memory must be a positive number of bytes, got {self.kv_memory}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be >= 1, got {self.max_graph_batch}")
        if self.on_pool_exhausted not in ("raise", "preempt"):
            raise ValueError(
                f"on_pool_exhausted must be 'raise' or 'preempt', got {self.on_pool_exhausted!r}"
            )
