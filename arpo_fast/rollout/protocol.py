"""Tool-call protocol: tags, an incremental stop detector, call parsing and result tokens.

The model writes ``<search>query</search>`` or ``<python>code</python>`` inside its reasoning, reads
`` <result>\\n{output}\\n</result>`` and ends with ``<answer>...\\boxed{...}</answer>``. Token in,
token out: generated ids are never re-tokenised; a tool's output is encoded on its own and appended
with loss mask 0. Nothing here raises on what the model writes: a malformed call becomes a
:class:`ToolCall` whose ``error`` says what was wrong, and that text is what the model reads back.
"""

from __future__ import annotations

import codecs
import copy
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Optional

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

    def __post_init__(self):
        names = [*self.tool_names, self.result_tag, self.answer_tag, self.think_tag]
        for name in names:
            if not isinstance(name, str) or not _TAG_NAME.match(name):
                raise ValueError(f"tag name {name!r} must be letters, digits, '_' or '-' "
                                 "and start with a letter or '_'")
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
    body = segment[start + len(open_tag):close_at]
    problem = _body_problem(segment[:start], body, config)
    return ToolCall(name, body, problem)


def _stop_tags(config: ProtocolConfig) -> tuple[str, ...]:
    """The tags the protocol acts on inside a segment: a closing tool tag ends the segment as a
    call, the closing answer tag ends the trajectory."""
    return (*(config.close_tag(n) for n in config.tool_names), config.close_tag(config.answer_tag))


def _body_problem(before: str, body: str, config: ProtocolConfig) -> Optional[str]:
    """Why a call body cannot run (nested or unclosed tags, empty, not UTF-8), or None.

    Only a tag the protocol acts on makes a call nested. A body runs up to the first stop tag, so
    from the detector it never holds one; other tags (``<search>`` or ``<result>`` in a string
    literal of python code) are the body's own text."""
    inner = [t for t in _stop_tags(config) if t in body]
    if inner:
        return f"The call contains the tag {inner[0]}: tool calls cannot be nested."
    for other in config.tool_names:
        if before.count(config.open_tag(other)) > before.count(config.close_tag(other)):
            return (f"An earlier {config.open_tag(other)} was never closed with "
                    f"{config.close_tag(other)}.")
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


# ---------------------------------------------------------------------------------------------
# Token ids -> exact bytes. Decoding the whole history after every token costs O(n^2); decoding one
# token alone is wrong for byte-level tokenizers, whose tokens can end inside a UTF-8 character.
# Mapping each id to its raw bytes and feeding an incremental UTF-8 decoder is exact and O(1).

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"  # SentencePiece's visible space


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode map: printable stand-in character -> byte value."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:  # bytes without a printable glyph are shifted past 255, in order
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _decoder_types(tokenizer: Any) -> set[str]:
    """The ``type`` names in a fast tokenizer's decoder (a Sequence lists several), or empty."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        spec = json.loads(decoder.__getstate__())
    except Exception:  # no fast decoder: fall back to per-token decoding
        return set()
    found: set[str] = set()
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class TokenBytes:
    """Maps token ids to the exact bytes they stand for, with a per-id cache.

    Byte-level BPE (GPT-2, Llama-3, Qwen) and SentencePiece with byte fallback (Llama-2, Mistral) are
    exact. Other tokenizers use ``decode([id])``, which may drop a leading space.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        types = _decoder_types(tokenizer)
        if "ByteLevel" in types:
            self.mode = "byte_level"
        elif types & {"Metaspace", "ByteFallback", "Replace"}:
            self.mode = "sentencepiece"
        else:
            self.mode = "decode"
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {int(i): str(getattr(t, "content", t)) for i, t in added.items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._lookup(int(token_id))
        return cached

    def _lookup(self, token_id: int) -> bytes:
        if token_id in self._added:  # added and special tokens are stored as plain text
            return self._added[token_id].encode("utf-8")
        if self.mode == "decode":
            return self.tokenizer.decode([token_id]).encode("utf-8", "surrogateescape")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""  # out of vocabulary: contributes no text rather than crashing the rollout
        if self.mode == "byte_level":
            table = _byte_level_table()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode("utf-8")
        match = _BYTE_FALLBACK.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace(_SPIECE_SPACE, " ").encode("utf-8")


# ---------------------------------------------------------------------------------------------


class StopDetector:
    """Watches generated ids one at a time and reports a closing tool tag, the answer's end or EOS.

    Text is rebuilt from exact token bytes; undecodable bytes become lone surrogates (the
    ``surrogateescape`` handler), so they never match a tag and the parser can name them. Each
    ``feed`` looks only at the new characters plus the last ``len(longest stop) - 1`` before them, so
    a tag split across tokens in any way is found, in O(1) work per token.
    """

    def __init__(self, tokenizer: Any, config: ProtocolConfig = ProtocolConfig(),
                 eos_token_ids: Optional[Iterable[int]] = None,
                 token_bytes: Optional[TokenBytes] = None):
        self.config = config
        self._bytes = token_bytes or TokenBytes(tokenizer)
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self._stops = {config.close_tag(n): n for n in config.tool_names}
        self._stops[config.close_tag(config.answer_tag)] = None
        self._keep = max(len(s) for s in self._stops) - 1
        self.reset()

    def reset(self) -> None:
        """Start a new segment (call after appending a tool result)."""
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._pieces: list[str] = []
        self._length = 0
        self._tail = ""

    @property
    def text(self) -> str:
        """The segment's text so far (bytes of an unfinished character are not included yet)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def feed(self, token_id: int) -> Optional[tuple[str, Optional[str], int]]:
        """Add one token; on a stop return ``(kind, tool_name, stop_start)`` with kind ``tool``,
        ``answer`` or ``eos`` and ``stop_start`` an index into :attr:`text`; else None."""
        if int(token_id) in self.eos_token_ids:
            return ("eos", None, self._length)
        new = self._decoder.decode(self._bytes(token_id))
        if not new:
            return None
        window = self._tail + new
        self._pieces.append(new)
        self._length += len(new)
        self._tail = window[-self._keep:] if self._keep else ""
        best = None
        for stop, name in self._stops.items():
            at = window.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, name)
        if best is None:
            return None
        start = self._length - len(window) + best[0]
        return ("answer", None, start) if best[1] is None else ("tool", best[1], start)

    def fork(self) -> "StopDetector":
        """An independent copy (for a branch that continues from the same point)."""
        twin = copy.copy(self)
        twin._pieces = list(self._pieces)
        twin._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        twin._decoder.setstate(self._decoder.getstate())
        return twin


class Protocol:
    """Per-tokenizer protocol: formats and encodes tool results, and makes per-trajectory states."""

    def __init__(self, tokenizer: Any, config: ProtocolConfig = ProtocolConfig(),
                 eos_token_ids: Optional[Iterable[int]] = None,
                 available_tools: Optional[Iterable[str]] = None):
        self.tokenizer = tokenizer
        self.config = config
        self.token_bytes = TokenBytes(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.available_tools = None if available_tools is None else frozenset(available_tools)

    def result_ids(self, output: str) -> list[int]:
        """Token ids of `` <result>\\n{output}\\n</result>``, encoded alone (no BOS), loss mask 0."""
        return list(self.tokenizer.encode(format_result(output, self.config),
                                          add_special_tokens=False))

    def new_trajectory(self) -> "TrajectoryProtocol":
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
        trailing = text[start + stop_len:]
        if kind == "answer":
            return Event("answer", trailing=trailing)
        if self.calls >= self.protocol.config.max_calls:
            # past the limit the call is not run; the reference appends EOS and ends the trajectory
            return Event("limit", ToolCall(name, "", f"The limit of {self.protocol.config.max_calls} "
                                           "tool calls per answer was reached."), trailing)
        self.calls += 1
        call = parse_tool_call(text, name, start, self.protocol.config)
        tools = self.protocol.available_tools
        if call.ok and tools is not None and name not in tools:
            call = ToolCall(name, call.body, f"Unknown tool '{name}'; available: "
                                             f"{', '.join(sorted(tools)) or 'none'}.")
        return Event("call", call, trailing)

    def result_ids(self, output: str) -> list[int]:
        """Encode a tool's output for appending, and start watching a new segment."""
        self.detector.reset()
        return self.protocol.result_ids(output)

    def fork(self) -> "TrajectoryProtocol":
        """An independent copy that shares the call count so far (for a branch)."""
        twin = copy.copy(self)
        twin.detector = self.detector.fork()
        return twin
