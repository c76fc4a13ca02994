"""Streaming text out of token ids: the pieces of text each step adds.

A token is not always a whole character (byte-level BPE splits multi-byte characters) and a tokenizer's decoder may
join a token to the one before it (WordPiece ``##`` pieces, clean-up of spaces before punctuation), so decoding
tokens one by one does not give the final text. `TextStreamer` decodes every token so far at each step and yields
what was appended to the text it already yielded, holding back a trailing incomplete character (U+FFFD) until the
next step. The pieces of a stream join to ``tokenizer.decode`` of all its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from batchplex.continuous import TokenStreamer
from transformers import PreTrainedTokenizerBase

__all__ = ["TextStreamer"]

_INCOMPLETE = "\ufffd"


class TextStreamer(TokenStreamer):
    """Text pieces for one stream (decodes on the event loop, once per step that brought tokens)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._text = ""

    def push(self, new_tokens: Sequence[int]) -> list[str]:
        self._ids.extend(new_tokens)
        return self._emit(final=False)

    def finish(self) -> list[str]:
        return self._emit(final=True)

    def _emit(self, final: bool) -> list[str]:
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if not final and text.endswith(_INCOMPLETE):
            return []
        if not text.startswith(self._text):  # decoding rewrote text already yielded: never yield it twice
            return []
        piece, self._text = text[len(self._text):], text
        return [piece] if piece else []
