"""Streaming token ids -> text without ever emitting half a UTF-8 character.

Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix
ends in U+FFFD. We keep two offsets into the ids (the prefix/read offset technique): the text of
ids[prefix:read] was already emitted, and each step decodes only ids[prefix:], emitting the part
past the already-emitted text once it no longer ends in U+FFFD. Both windows start at a
character boundary, so the deltas concatenate to the decode of all ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add one or more ids; return the text they completed (possibly empty)."""
        if isinstance(token_ids, int):
            self.token_ids.append(token_ids)
        else:
            self.token_ids.extend(token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if new_text.endswith(REPLACEMENT_CHAR) or not new_text.startswith(prefix_text):
            return ""  # an incomplete character: wait for the ids that finish it
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The held-back tail at the end of the stream (U+FFFD if the ids end mid-character)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]
