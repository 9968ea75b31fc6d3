"""The ARPO rollout and what it needs besides the engine.

``tree``: the tree rollout, which drives an engine (any :class:`engine_api.RolloutEngine`) and the
tool executor. ``protocol``: tags, the incremental stop detector and result tokens. ``tools``: the
python sandbox, BM25 and HTTP search, and the concurrent executor. ``rewards``: the reference's
scoring and others, chosen per ``data_source``. Only ``tree`` and ``engine_api`` import the engine.
"""

from arpo_fast.rollout.protocol import (
    Event,
    Protocol,
    ProtocolConfig,
    StopDetector,
    ToolCall,
    TrajectoryProtocol,
    format_result,
    parse_tool_call,
)
from arpo_fast.rollout.rewards import RewardConfig, RewardResult, compute_reward, register_reward

__all__ = [
    "Event",
    "Protocol",
    "ProtocolConfig",
    "RewardConfig",
    "RewardResult",
    "StopDetector",
    "ToolCall",
    "TrajectoryProtocol",
    "compute_reward",
    "format_result",
    "parse_tool_call",
    "register_reward",
]
