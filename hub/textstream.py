"""When generation stops, and which text is final: shared by run-local and the head.

Text is decoded from the whole token list each time (a token may complete a UTF-8
character started by the previous one), and only text that can no longer change is
emitted: an incomplete character (U+FFFD tail) and a possible stop-string prefix are
held back until the next token decides them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

StopReason = Literal["eos", "max_tokens", "stop"]


class TextStream:
    """Decodes the growing token list; finds stop strings; emits only final text."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: tuple[str, ...],
                 on_text: Callable[[str], None] | None) -> None:
        self._decode, self._stop, self._on_text = decode, tuple(s for s in stop if s), on_text
        self._sent = 0
        self._cut: int | None = None

    def update(self, tokens: list[int]) -> bool:
        """True once a stop string appeared."""
        if self._decode is None or (self._on_text is None and not self._stop):
            return False
        text = self._decode(tokens)
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._cut = min(hits)
            self._emit(text[:self._cut])
            return True
        self._emit(text[:len(text) - self._held_back(text)])
        return False

    def finish(self, tokens: list[int]) -> str:
        """The final text (cut before a stop string); emits what was held back."""
        if self._decode is None:
            return ""
        text = self._decode(tokens)
        text = text if self._cut is None else text[:self._cut]
        self._emit(text)
        return text

    def _held_back(self, text: str) -> int:
        """Chars at the end that may still change: a U+FFFD tail or a stop-string prefix."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self._stop:
            held = max(held, max((n for n in range(1, len(s)) if text.endswith(s[:n])), default=0))
        return held

    def _emit(self, final: str) -> None:
        if self._on_text is not None and len(final) > self._sent:
            self._on_text(final[self._sent:])
            self._sent = len(final)


def stop_reason(token: int, eos: frozenset[int], stream: TextStream, tokens: list[int],
                max_tokens: int) -> StopReason | None:
    """Why generation stops after ``token`` (already appended to ``tokens``), or None."""
    if token in eos:
        return "eos"
    if stream.update(tokens):
        return "stop"
    return "max_tokens" if len(tokens) >= max_tokens else None
