"""One output parser for the Python API and the HTTP server, streaming and non-streaming alike.

:class:`OutputParser` chains :class:`~minicpmv.output.reasoning.ReasoningParser` (think block first) and, on the
content part only, :class:`~minicpmv.output.tool_calls.ToolCallParser`. Tool XML stays plain content when no tools
were given or ``tool_choice`` is ``"none"``; tool XML inside the reasoning is always reasoning. With
``normalize_newlines`` the escaped-newline normalisation is applied to the final content text (after tool parsing,
so tool arguments are never touched; it works within each run of content between tool-call events).

Events (all frozen dataclasses with a class-level ``kind`` string): :class:`ReasoningDelta` ("reasoning"),
:class:`ContentDelta` ("content"), :class:`ToolCallStart` ("tool_call_start"), :class:`ToolCallArgsDelta`
("tool_call_args"), :class:`ToolCallEnd` ("tool_call_end"), :class:`ToolCallAbort` ("tool_call_abort"). :func:`aggregate` folds any event list
into a :class:`ParsedOutput`; :meth:`OutputParser.parse_all` is exactly ``aggregate(feed(text) + finish())``, so a
non-streaming answer equals the aggregation of the streamed events for every chunking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from minicpmv.output.reasoning import (
    ContentDelta,
    EscapedNewlineNormalizer,
    ReasoningDelta,
    ReasoningParser,
    normalize_escaped_newlines,
)
from minicpmv.output.tool_calls import (
    ToolCall,
    ToolCallAbort,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallParser,
    ToolCallStart,
    collect_tool_calls,
)

__all__ = [
    "ContentDelta", "Event", "OutputParser", "ParsedOutput", "ReasoningDelta", "ToolCall", "ToolCallAbort",
    "ToolCallArgsDelta", "ToolCallEnd", "ToolCallStart", "aggregate", "normalize_escaped_newlines", "parse_all",
]

Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd | ToolCallAbort


@dataclass
class ParsedOutput:
    """The final split of one output. ``reasoning`` / ``content`` are None when empty."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def aggregate(events: Iterable[Event]) -> ParsedOutput:
    """Fold events into a :class:`ParsedOutput` (void calls dropped, only complete calls kept)."""
    events = list(events)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return ParsedOutput(reasoning or None, content or None, collect_tool_calls(events))


class OutputParser:
    """Incremental reasoning + content + tool-call parser for one generated output.

    ``starts_in_reasoning``: the prompt ended inside a think block (thinking enabled).
    ``tools``: the request's OpenAI tool definitions (None or [] -> no tool parsing).
    ``tool_choice_none``: the request said ``tool_choice="none"`` -> no tool parsing.
    ``normalize_newlines``: turn literal backslash-n pairs in the content into newlines.
    ``id_factory``: tool-call id maker (default ``call_<24 hex>``).
    """

    def __init__(self, starts_in_reasoning: bool, tools: list | None = None, tool_choice_none: bool = False, *,
                 normalize_newlines: bool = False, id_factory: Callable[[], str] | None = None) -> None:
        self._reasoning = ReasoningParser(starts_in_reasoning)
        self._tools = ToolCallParser(tools, id_factory=id_factory) if tools and not tool_choice_none else None
        self._norm = EscapedNewlineNormalizer() if normalize_newlines else None
        self._used = False
        self._finished = False

    @property
    def parses_tools(self) -> bool:
        return self._tools is not None

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("OutputParser.feed() called after finish()")
        self._used = True
        return self._post(self._route(self._reasoning.feed(delta)))

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        self._finished = True
        events = self._route(self._reasoning.finish())
        if self._tools is not None:
            events += self._tools.finish()
        out = self._post(events)
        if self._norm is not None:
            tail = self._norm.flush()
            if tail:
                out.append(ContentDelta(tail))
        return out

    def parse_all(self, text: str) -> ParsedOutput:
        """Parse a whole output with this (fresh) parser: ``aggregate(feed(text) + finish())``."""
        if self._used or self._finished:
            raise RuntimeError("parse_all() needs a fresh OutputParser")
        events = self.feed(text)
        return aggregate(events + self.finish())

    def _route(self, events: list) -> list:
        if self._tools is None:
            return events
        out: list = []
        for e in events:
            if isinstance(e, ContentDelta):
                out += self._tools.feed(e.text)
            else:
                out.append(e)
        return out

    def _post(self, events: list) -> list:
        if self._norm is None:
            return events
        out: list = []
        for e in events:
            if isinstance(e, ContentDelta):
                text = self._norm.feed(e.text)
                if text:
                    out.append(ContentDelta(text))
            elif isinstance(e, ReasoningDelta):
                out.append(e)
            else:  # a tool-call event ends the current content run: release a held backslash first
                tail = self._norm.flush()
                if tail:
                    out.append(ContentDelta(tail))
                out.append(e)
        return out


def parse_all(text: str, starts_in_reasoning: bool, tools: list | None = None, tool_choice_none: bool = False, *,
              normalize_newlines: bool = False, id_factory: Callable[[], str] | None = None) -> ParsedOutput:
    """Non-streaming convenience: ``OutputParser(...).parse_all(text)``."""
    return OutputParser(starts_in_reasoning, tools, tool_choice_none, normalize_newlines=normalize_newlines,
                        id_factory=id_factory).parse_all(text)
