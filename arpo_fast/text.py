"""Generated token ids as exact text, incrementally: ``TokenBytes`` maps an id to the bytes it stands
for, and ``StopStrings`` finds the first of a set of stop strings in a growing generation.

Decoding the whole history after every token costs O(n^2); decoding one token alone is wrong for
byte-level tokenizers, whose tokens can end inside a UTF-8 character. Mapping each id to its raw
bytes and feeding an incremental UTF-8 decoder is exact and O(1) per token.
"""

from __future__ import annotations

import codecs
import copy
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, Optional

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
        spec = json.loads(decoder.__getstate__())  # type: ignore[union-attr,arg-type]  # None raises: caught
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


class StopStrings:
    """Watches generated ids one at a time for the first occurrence of any of ``stops``.

    Text is rebuilt from exact token bytes; undecodable bytes become lone surrogates (the
    ``surrogateescape`` handler), so they never match a stop string. Each ``feed`` looks only at the
    new characters plus the last ``len(longest stop) - 1`` before them, so a stop string split
    across tokens in any way is found, in O(1) work per token.
    """

    def __init__(self, token_bytes: TokenBytes, stops: Iterable[str]):
        self.stops = tuple(dict.fromkeys(stops))
        if not self.stops or any(not s for s in self.stops):
            raise ValueError("StopStrings needs at least one stop string, none of them empty")
        self._bytes = token_bytes
        self._keep = max(len(s) for s in self.stops) - 1
        self.reset()

    def reset(self) -> None:
        """Forget the text so far (start a new segment)."""
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._pieces: list[str] = []
        self._length = 0
        self._tail = ""

    @property
    def text(self) -> str:
        """The text so far (bytes of an unfinished character are not included yet)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def feed(self, token_id: int) -> Optional[tuple[str, int]]:
        """Add one token; return ``(stop string, its start index in text)`` for the earliest stop
        string that the new characters complete, else None."""
        new = self._decoder.decode(self._bytes(token_id))
        if not new:
            return None
        window = self._tail + new
        self._pieces.append(new)
        self._length += len(new)
        self._tail = window[-self._keep :] if self._keep else ""
        best = None
        for stop in self.stops:
            at = window.find(stop)
            if at >= 0 and (best is None or at < best[1]):
                best = (stop, at)
        if best is None:
            return None
        return best[0], self._length - len(window) + best[1]

    def fork(self) -> StopStrings:
        """An independent copy (for a branch that continues from the same point)."""
        twin = copy.copy(self)
        twin._pieces = list(self._pieces)
        twin._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        twin._decoder.setstate(self._decoder.getstate())
        return twin
