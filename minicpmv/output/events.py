"""What the output parser emits, and the final result those events add up to.

Every event is a frozen dataclass with a class-level ``kind``. For one tool call: a :class:`ToolCallStart` (once its
name is known and is one of the tools), then :class:`ToolCallArgsDelta` pieces whose concatenation is one JSON object,
then :class:`ToolCallEnd`. A started call always ends: the parser never takes a call back.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of reasoning text (inside the think block)."""

    kind: ClassVar[str] = "reasoning"
    text: str


@dataclass(frozen=True)
class ContentDelta:
    """A piece of answer text."""

    kind: ClassVar[str] = "content"
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call to ``name`` begins (its id is final)."""

    kind: ClassVar[str] = "tool_call_start"
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    """A piece of the call's arguments JSON text."""

    kind: ClassVar[str] = "tool_call_args"
    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    """The call is complete: its argument pieces form one JSON object."""

    kind: ClassVar[str] = "tool_call_end"
    index: int


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd


@dataclass
class ToolCall:
    """One complete tool call; ``arguments_json`` is a JSON object string."""

    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> dict:
        return json.loads(self.arguments_json)


@dataclass
class ParsedOutput:
    """The final split of one output. ``reasoning`` / ``content`` are None when empty."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def collect_tool_calls(events: Iterable[Event]) -> list[ToolCall]:
    """The complete calls described by a stream of events, in index order."""
    calls: dict[int, list] = {}
    done: set[int] = set()
    for e in events:
        if isinstance(e, ToolCallStart):
            calls[e.index] = [e.id, e.name, []]
        elif isinstance(e, ToolCallArgsDelta):
            calls[e.index][2].append(e.text)
        elif isinstance(e, ToolCallEnd):
            done.add(e.index)
    return [ToolCall(c[0], c[1], "".join(c[2])) for i, c in sorted(calls.items()) if i in done]


def aggregate(events: Iterable[Event]) -> ParsedOutput:
    """Fold events into a :class:`ParsedOutput`: the non-streamed result is the fold of the streamed events."""
    events = list(events)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return ParsedOutput(reasoning or None, content or None, collect_tool_calls(events))
