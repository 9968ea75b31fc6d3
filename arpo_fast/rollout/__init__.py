"""ARPO rollout pieces that do not need the engine: the tool-call protocol, tools and rewards.

``protocol``: tags, the incremental stop detector and result tokens. ``tools``: the python sandbox,
BM25 and HTTP search, and the concurrent executor. ``rewards``: the reference's scoring and others,
chosen per ``data_source``.
"""

from arpo_fast.rollout.protocol import (Event, Protocol, ProtocolConfig, StopDetector, ToolCall,
                                        TrajectoryProtocol, format_result, parse_tool_call)
from arpo_fast.rollout.rewards import RewardConfig, RewardResult, compute_reward, register_reward

__all__ = ["Event", "Protocol", "ProtocolConfig", "RewardConfig", "RewardResult", "StopDetector",
           "ToolCall", "TrajectoryProtocol", "compute_reward", "format_result", "parse_tool_call",
           "register_reward"]
