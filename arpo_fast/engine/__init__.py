"""Rollout engine: paged KV cache, forker, paged-KV forward of Llama-family models, generation."""

from arpo_fast.engine.engine import Engine
from arpo_fast.engine.generation import Completion
from arpo_fast.engine.kv_cache import PagedKVCache
from arpo_fast.engine.model import SUPPORTED_MODEL_TYPES, PagedModel
from arpo_fast.engine.params import EngineConfig, SamplingParams
from arpo_fast.engine.runner import StepOutput

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Completion",
    "Engine",
    "EngineConfig",
    "PagedKVCache",
    "PagedModel",
    "SamplingParams",
    "StepOutput",
]
