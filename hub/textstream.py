"""When generation stops, and which text is final: shared by run-local and the head.

A token may complete a UTF-8 character started by the previous one, and only text that
can no longer change is emitted: an incomplete character (U+FFFD tail) and a possible
stop-string prefix are held back until the next token decides them. Each token decodes a
window of a few recent tokens, not the whole list (that was quadratic in the answer's
length; on the head it ran on the MQTT network thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

StopReason = Literal["eos", "max_tokens", "stop"]
Decode = Callable[[list[int]], str]

MAX_PENDING = 16  # undecided tokens: a character split over tokens needs at most 4 (UTF-8)
KEEP = 4  # undecided tokens kept past a cut: the bytes that decide any character across it


class _Detokenizer:
    """Incremental decoding, as HF text-generation-inference does it.

    The window is the tokens read last (context) and those after them. Decoded in their
    context, new tokens get the text they have in the whole list (a SentencePiece decoder
    strips the space of a text's first word); their text is final once it does not end in
    U+FFFD. More than MAX_PENDING undecided tokens are no split character but invalid bytes
    or tokens that decode to nothing; the window then sheds some (``_shrink``), so its size
    stays below about 2 x MAX_PENDING.
    """

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._context: list[int] = []
        self._context_text = ""
        self._pending: list[int] = []  # tokens after the context, their text not final yet
        self._seen = 0  # tokens pushed so far

    def push(self, tokens: list[int]) -> tuple[str, str]:
        """(text that became final, the text after it, which may still change)."""
        self._pending += tokens[self._seen:]
        self._seen = len(tokens)
        text = self._decode(self._context + self._pending)
        if len(text) > len(self._context_text) and not text.endswith("\ufffd"):
            final = text[len(self._context_text):]
            self._context, self._pending = self._pending, []
            self._context_text = self._decode(self._context)
            return final, ""
        final = self._shrink(text) if len(self._pending) > MAX_PENDING else ""
        return final, text[len(self._context_text) + len(final):]

    def _shrink(self, text: str) -> str:
        """Drop pending tokens that decode to nothing (skipped special tokens), then take all
        but the last KEEP as decoded unless a character spans the cut; the text taken."""
        kept = [t for t in self._pending if self._decode([t])]
        if len(kept) < len(self._pending) and self._decode(self._context + kept) == text:
            self._pending = kept
        if len(self._pending) <= MAX_PENDING:
            return ""
        head = self._decode(self._context + self._pending[:-KEEP])
        rest = self._decode(self._context + self._pending[-KEEP:])
        if head + rest[len(self._context_text):] != text:
            return ""  # a later cut will not split it
        self._pending = self._pending[-KEEP:]  # the context stays: it still leads the window
        return head[len(self._context_text):]


class TextStream:
    """Decodes the growing token list; finds stop strings; emits only final text."""

    def __init__(self, decode: Decode | None, stop: tuple[str, ...], on_text: Callable[[str], None] | None) -> None:
        self._decode, self._stop, self._on_text = decode, tuple(s for s in stop if s), on_text
        self._detokenizer = _Detokenizer(decode) if decode is not None else None
        self._keep = max((len(s) for s in self._stop), default=1) - 1  # final chars a stop string may still start in
        self._text = ""  # the final text from offset `_base` on: what stop strings and _emit still need
        self._base = 0
        self._sent = 0
        self._cut: int | None = None

    def update(self, tokens: list[int]) -> bool:
        """True once a stop string appeared (``tokens`` grows between calls)."""
        if self._detokenizer is None or (self._on_text is None and not self._stop):
            return False
        if self._cut is not None:
            return True
        final, undecided = self._detokenizer.push(tokens)
        self._text += final
        text = self._text + undecided  # the whole text from _base: an earlier stop string was seen earlier
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._cut = self._base + min(hits)
            self._emit(text, min(hits))
            return True
        self._emit(text, len(text) - self._held_back(text))
        self._forget()
        return False

    def finish(self, tokens: list[int]) -> str:
        """The final text (cut before a stop string); emits what was held back."""
        if self._decode is None:
            return ""
        text = self._decode(tokens)
        text = text if self._cut is None else text[:self._cut]
        if self._on_text is not None and len(text) > self._sent:
            self._on_text(text[self._sent:])
            self._sent = len(text)
        return text

    def _held_back(self, text: str) -> int:
        """Chars at the end that may still change: a U+FFFD tail or a stop-string prefix."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self._stop:
            held = max(held, max((n for n in range(1, len(s)) if text.endswith(s[:n])), default=0))
        return held

    def _emit(self, text: str, end: int) -> None:
        """Emit ``text[:end]`` (text from offset _base) past what was sent (counted without on_text too)."""
        if self._base + end > self._sent:
            if self._on_text is not None:
                self._on_text(text[self._sent - self._base:end])
            self._sent = self._base + end

    def _forget(self) -> None:
        """Drop final text that is sent and too far back to hold part of a stop string."""
        base = max(self._base, min(self._sent, self._base + len(self._text) - self._keep))
        self._text, self._base = self._text[base - self._base:], base


def stop_reason(token: int, eos: frozenset[int], stream: TextStream, tokens: list[int],
                max_tokens: int) -> StopReason | None:
    """Why generation stops after ``token`` (already appended to ``tokens``), or None."""
    if token in eos:
        return "eos"
    if stream.update(tokens):
        return "stop"
    return "max_tokens" if len(tokens) >= max_tokens else None
