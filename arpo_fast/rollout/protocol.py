"""Tool-call protocol: tags, an incremental stop detector, call parsing and result tokens.

The model writes ``<search>query</search>`` or ``<python>code</python>`` inside its reasoning, reads
`` <result>\\n{output}\\n</result>`` and ends with ``<answer>...\\boxed{...}</answer>``. Token in,
token out: generated ids are never re-tokenised; a tool's output is encoded on its own and appended
with loss mask 0. Nothing here raises on what the model writes: a malformed call becomes a
:class:`ToolCall` whose ``error`` says what was wrong, and that text is what the model reads back.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from arpo_fast.text import StopStrings, TokenBytes

_TAG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class ProtocolConfig:
    """Tag names and the per-trajectory call limit. Tags are ``<name>`` and ``</name>``."""

    tool_names: tuple[str, ...] = ("search", "python")
    """Tools the model may call; a closing tag of any of them ends a generation segment."""
    result_tag: str = "result"
    answer_tag: str = "answer"
    think_tag: str = "think"
    max_calls: int = 3
    """Calls allowed per trajectory (the reference uses 3 for reasoning, 6 for deep search)."""
    stop_at_answer: bool = False
    """End a trajectory at ``</answer>``. Off (the reference): it goes on to EOS, so text written
    after the answer is scored (as bad format) and the model learns to stop."""

    def __post_init__(self):
        names = [*self.tool_names, self.result_tag, self.answer_tag, self.think_tag]
        for name in names:
            if not isinstance(name, str) or not _TAG_NAME.match(name):
                raise ValueError(
                    f"tag name {name!r} must be letters, digits, '_' or '-' and start with a letter or '_'"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"tag names must be distinct, got {names}")
        if not self.tool_names:
            raise ValueError("tool_names is empty: the protocol needs at least one tool")
        if self.max_calls < 0:
            raise ValueError(f"max_calls must be >= 0, got {self.max_calls}")

    @staticmethod
    def open_tag(name: str) -> str:
        return f"<{name}>"

    @staticmethod
    def close_tag(name: str) -> str:
        return f"</{name}>"


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: the tool's tag name, its body, and what was wrong, if anything."""

    name: str
    body: str
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Event:
    """What the detector saw end: ``kind`` is ``call``, ``limit``, ``answer`` or ``eos``.

    ``call`` carries the parsed call (run it, or read back ``call.error``); ``limit`` means a call past
    the per-trajectory limit: it is not run and the trajectory should end. ``trailing`` is generated
    text after the stop string that came in the same token (a tokenizer may merge ``</python>\\n``).
    """

    kind: str
    call: Optional[ToolCall] = None
    trailing: str = ""


def parse_tool_call(segment: str, name: str, close_at: int, config: ProtocolConfig) -> ToolCall:
    """Parse the call of tool ``name`` whose closing tag starts at ``segment[close_at]``.

    ``segment`` is the text generated since the last tool result. The body is the text after the
    last ``<name>`` before the closing tag, as in the reference. Never raises.
    """
    open_tag = config.open_tag(name)
    start = segment.rfind(open_tag, 0, close_at)
    if start < 0:
        return ToolCall(name, "", f"{config.close_tag(name)} was written without an opening {open_tag}.")
    body = segment[start + len(open_tag) : close_at]
    problem = _body_problem(segment[:start], body, config)
    return ToolCall(name, body, problem)


def _stop_tags(config: ProtocolConfig) -> tuple[str, ...]:
    """The tags the protocol acts on inside a segment: a closing tool tag ends the segment as a
    call, the closing answer tag ends the trajectory."""
    return (*(config.close_tag(n) for n in config.tool_names), config.close_tag(config.answer_tag))


def _body_problem(before: str, body: str, config: ProtocolConfig) -> Optional[str]:
    """Why a call body cannot run (nested or unclosed tags, a closing result tag, empty, not
    UTF-8), or None.

    Only a tag the protocol acts on makes a call nested. A body runs up to the first stop tag, so
    from the detector it never holds one; other tags (``<search>`` or ``<result>`` in a string
    literal of python code) are the body's own text. The closing result tag is the one exception:
    it ends what a tool answered, so model-written text holding it could pass for the end of a
    tool result, in the history and to the format check; such a call is not run."""
    inner = [t for t in _stop_tags(config) if t in body]
    if inner:
        return f"The call contains the tag {inner[0]}: tool calls cannot be nested."
    result_close = config.close_tag(config.result_tag)
    if result_close in body:
        return f"The call contains {result_close}, which only a tool's answer may hold; it was not run."
    for other in config.tool_names:
        if before.count(config.open_tag(other)) > before.count(config.close_tag(other)):
            return f"An earlier {config.open_tag(other)} was never closed with {config.close_tag(other)}."
    if not body.strip():
        return "The call is empty: write the query or code between the tags."
    if any("\udc80" <= ch <= "\udcff" for ch in body):
        return "The call contains bytes that are not valid UTF-8 text."
    return None


def format_result(output: str, config: ProtocolConfig = ProtocolConfig()) -> str:
    """The text appended after a call: `` <result>\\n{output}\\n</result>``."""
    # a tool may hand back lone surrogates (undecodable bytes); the tokenizer needs real text
    try:
        output = output.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # surrogates that never were bytes
        output = output.encode("utf-8", "replace").decode("utf-8")
    return f" {config.open_tag(config.result_tag)}\n{output}\n{config.close_tag(config.result_tag)}"


class StopDetector:
    """Watches generated ids one at a time and reports a closing tool tag, the answer's end or EOS
    (:class:`~arpo_fast.text.StopStrings` over the protocol's closing tags), in O(1) work
    per token."""

    def __init__(
        self,
        tokenizer: Any,
        config: ProtocolConfig = ProtocolConfig(),
        eos_token_ids: Optional[Iterable[int]] = None,
        token_bytes: Optional[TokenBytes] = None,
    ):
        self.config = config
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self._tool_of: dict[str, Optional[str]] = {config.close_tag(n): n for n in config.tool_names}
        if config.stop_at_answer:
            self._tool_of[config.close_tag(config.answer_tag)] = None
        self._strings = StopStrings(token_bytes or TokenBytes(tokenizer), self._tool_of)

    def reset(self) -> None:
        """Start a new segment (call after appending a tool result)."""
        self._strings.reset()

    @property
    def text(self) -> str:
        """The segment's text so far (bytes of an unfinished character are not included yet)."""
        return self._strings.text

    def feed(self, token_id: int) -> Optional[tuple[str, Optional[str], int]]:
        """Add one token; on a stop return ``(kind, tool_name, stop_start)`` with kind ``call``,
        ``answer`` or ``eos`` and ``stop_start`` an index into :attr:`text`; else None."""
        if int(token_id) in self.eos_token_ids:
            return ("eos", None, len(self._strings.text))
        hit = self._strings.feed(token_id)
        if hit is None:
            return None
        name = self._tool_of[hit[0]]
        return ("answer", None, hit[1]) if name is None else ("call", name, hit[1])

    def fork(self) -> StopDetector:
        """An independent copy (for a branch that continues from the same point)."""
        twin = copy.copy(self)
        twin._strings = self._strings.fork()
        return twin


class Protocol:
    """Per-tokenizer protocol: formats and encodes tool results, and makes per-trajectory states."""

    def __init__(
        self,
        tokenizer: Any,
        config: ProtocolConfig = ProtocolConfig(),
        eos_token_ids: Optional[Iterable[int]] = None,
        available_tools: Optional[Iterable[str]] = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.token_bytes = TokenBytes(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.available_tools = None if available_tools is None else frozenset(available_tools)

    @property
    def eos_token_id(self) -> Optional[int]:
        """The EOS appended after a call past the limit: the tokenizer's, else the first of
        ``eos_token_ids``, else None."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None and self.eos_token_ids:
            eos = sorted(self.eos_token_ids)[0]
        return eos

    def result_ids(self, output: str) -> list[int]:
        """Token ids of `` <result>\\n{output}\\n</result>``, encoded alone (no BOS), loss mask 0."""
        return list(self.tokenizer.encode(format_result(output, self.config), add_special_tokens=False))

    def new_trajectory(self) -> TrajectoryProtocol:
        return TrajectoryProtocol(self)


@dataclass
class TrajectoryProtocol:
    """One trajectory's protocol state: its stop detector and how many calls it has made."""

    protocol: Protocol
    calls: int = 0
    detector: StopDetector = field(init=False)

    def __post_init__(self):
        p = self.protocol
        self.detector = StopDetector(p.tokenizer, p.config, p.eos_token_ids, p.token_bytes)

    def feed(self, token_id: int) -> Optional[Event]:
        """Add one generated token; return an :class:`Event` when something ended, else None."""
        hit = self.detector.feed(token_id)
        if hit is None:
            return None
        kind, name, start = hit
        text = self.detector.text
        if kind == "eos":
            return Event("eos")
        stop_len = len(self.protocol.config.close_tag(name or self.protocol.config.answer_tag))
        trailing = text[start + stop_len :]
        if kind == "answer" or name is None:  # a tool call's stop always names its tool
            return Event("answer", trailing=trailing)
        if self.calls >= self.protocol.config.max_calls:
            # past the limit the call is not run; the reference appends EOS and ends the trajectory
            return Event(
                "limit",
                ToolCall(
                    name,
                    "",
                    f"The limit of {self.protocol.config.max_calls} tool calls per answer was reached.",
                ),
                trailing,
            )
        self.calls += 1
        call = parse_tool_call(text, name, start, self.protocol.config)
        tools = self.protocol.available_tools
        if call.ok and tools is not None and name not in tools:
            call = ToolCall(
                name, call.body, f"Unknown tool '{name}'; available: {', '.join(sorted(tools)) or 'none'}."
            )
        return Event("call", call, trailing)

    def result_ids(self, output: str) -> list[int]:
        """Encode a tool's output for appending, and start watching a new segment."""
        self.detector.reset()
        return self.protocol.result_ids(output)

    def fork(self) -> TrajectoryProtocol:
        """An independent copy that shares the call count so far (for a branch)."""
        twin = copy.copy(self)
        twin.detector = self.detector.fork()
        return twin
