"""Incremental detokenization for streaming: text pieces that never split a UTF-8 character, at the
cost of one decode of a short window of tokens per token."""

from __future__ import annotations

from .tokenizer import Tokenizer


class StreamDecoder:
    """Turns a growing list of token ids into text pieces that never split a UTF-8 character.

    Each push decodes the tokens from the window's start and emits what the window's text gained
    since the last emission; a piece waits while the text ends in an incomplete byte sequence (which
    the decoder shows as U+FFFD). Every WINDOW tokens, once everything is out, the window restarts
    CONTEXT tokens back (tokenizers that strip a leading space decode a window's first token
    differently, and the same way each time), so a push costs O(WINDOW) tokens, not O(n)."""

    WINDOW = 16
    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0   # first token of the window
        self._done = 0    # characters of the window's text already emitted

    def _window_text(self) -> str:
        return self._tok.decode_unchecked(self._ids[self._start :], self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._window_text()
        if len(text) <= self._done or text.endswith("\ufffd"):
            return ""
        piece = text[self._done :]
        self._done = len(text)
        if len(self._ids) - self._start >= self.WINDOW:
            self._start = len(self._ids) - self.CONTEXT
            self._done = len(self._window_text())
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        text = self._window_text()
        piece = text[self._done :]
        self._start, self._done = len(self._ids), 0
        return piece
