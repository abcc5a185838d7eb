"""Parser events as an ordered list of output blocks (reasoning, text, tool call), and what each event changed:
the shape both the Responses API (output items) and Anthropic's Messages API (content blocks) stream."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from minicpmv.output.events import ContentDelta, Event, ReasoningDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart


@dataclass
class Block:
    kind: str  # "reasoning", "text" or "tool_call"
    index: int  # its position among the output's blocks
    text: str = ""  # the text; a tool call's arguments JSON
    call_id: str = ""
    name: str = ""
    closed: bool = False


@dataclass
class Change:
    what: str  # "open", "delta" or "close"
    block: Block
    text: str = ""  # the delta's text


class Blocks:
    def __init__(self):
        self.blocks: list[Block] = []
        self._open: Block | None = None  # the reasoning or text block being written
        self._calls: dict[int, Block] = {}  # parser call index -> its block

    def _new(self, kind: str, changes: list[Change], **kw) -> Block:
        block = Block(kind, len(self.blocks), **kw)
        self.blocks.append(block)
        changes.append(Change("open", block))
        return block

    def _close(self, block: Block | None, changes: list[Change]) -> None:
        if block is not None and not block.closed:
            block.closed = True
            changes.append(Change("close", block))

    def feed(self, events: Iterable[Event]) -> list[Change]:
        changes: list[Change] = []
        for e in events:
            if isinstance(e, (ReasoningDelta, ContentDelta)):
                if not e.text:
                    continue
                kind = "reasoning" if isinstance(e, ReasoningDelta) else "text"
                if self._open is None or self._open.kind != kind:
                    self._close(self._open, changes)
                    self._open = self._new(kind, changes)
                self._open.text += e.text
                changes.append(Change("delta", self._open, e.text))
            elif isinstance(e, ToolCallStart):
                self._close(self._open, changes)
                self._open = None
                self._calls[e.index] = self._new("tool_call", changes, call_id=e.id, name=e.name)
            elif isinstance(e, ToolCallArgsDelta):
                block = self._calls[e.index]
                block.text += e.text
                changes.append(Change("delta", block, e.text))
            elif isinstance(e, ToolCallEnd):
                self._close(self._calls[e.index], changes)
        return changes

    def finish(self) -> list[Change]:
        """Close whatever is still open (the output ended)."""
        changes: list[Change] = []
        for block in self.blocks:
            self._close(block, changes)
        self._open = None
        return changes
