"""Incremental detokenization: the text of a growing list of token ids, a few tokens at a time.

Decoding the whole output again for every new token costs O(n) per token. Instead, like vLLM's
incremental detokenizer, two offsets into the ids mark a window: `prefix` ids (already emitted,
kept only as context so that spaces and merges at the boundary decode as in the full text) and
the ids after `read` (not yet emitted). The new text is decode(window) minus decode(prefix).
A window whose text ends in U+FFFD is an incomplete UTF-8 sequence (one character split over
several byte-level tokens): it is held back until the next token completes it, or until `flush`.
Both offsets only move to such complete boundaries, so the emitted pieces concatenate to
`tokenizer.decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        """tokenizer: an HF tokenizer, or None (a checkpoint without one: every text is "")."""
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: ids kept as context, their text already emitted
        self.read_offset = 0  # ids from here on have not been emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]), cached until the offsets move

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.tokenizer is None or self.read_offset == len(self.ids):
            return ""
        window = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        # a window no longer than its prefix added only skipped (special) tokens so far
        if len(window) <= len(self._prefix_text) or (window.endswith(REPLACEMENT) and not final):
            return ""
        new_text = window[len(self._prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                                  skip_special_tokens=True)
        return new_text
