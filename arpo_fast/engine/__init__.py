"""Rollout engine: paged KV cache, forker, paged-KV forward of Llama-family models, generation."""

from arpo_fast.engine.engine import Engine  # noqa: F401
from arpo_fast.engine.generation import Completion  # noqa: F401
from arpo_fast.engine.kv_cache import PagedKVCache  # noqa: F401
from arpo_fast.engine.model import SUPPORTED_MODEL_TYPES, PagedModel  # noqa: F401
from arpo_fast.engine.params import EngineConfig, SamplingParams  # noqa: F401
from arpo_fast.engine.runner import StepOutput  # noqa: F401
