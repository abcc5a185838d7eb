"""One output parser per sequence: the engine feeds it each piece of detokenized text and keeps its events.

:class:`OutputParser` chains :class:`~minicpmv.output.reasoning.ReasoningParser` (think block first) and, on the
content only, :class:`~minicpmv.output.tool_calls.ToolCallParser`. Tool markup stays plain content when the request
has no tools (``tool_choice: "none"`` sends none). With ``normalize_newlines`` the escaped-newline clean-up is
applied to content text (after tool parsing, so tool arguments are never touched). The whole result is
:func:`~minicpmv.output.events.aggregate` of the events, so a streamed and a non-streamed answer cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable

from minicpmv.output.events import ContentDelta, Event, ParsedOutput, ReasoningDelta, aggregate
from minicpmv.output.reasoning import EscapedNewlineNormalizer, ReasoningParser
from minicpmv.output.tool_calls import TOOL_OPEN, ToolCallParser


class OutputParser:
    """``starts_in_reasoning``: the prompt ended inside a think block (thinking enabled). ``tools``: the request's
    OpenAI tool definitions (None or [] -> no tool parsing). ``normalize_newlines``: literal backslash-n pairs in the
    content become newlines. ``id_factory``: tool-call id maker (default ``call_<24 hex>``)."""

    def __init__(self, starts_in_reasoning: bool, tools: list | None = None, *, normalize_newlines: bool = False,
                 id_factory: Callable[[], str] | None = None) -> None:
        self._tools = ToolCallParser(tools, id_factory=id_factory) if tools else None
        self._reasoning = ReasoningParser(starts_in_reasoning, ends_at=(TOOL_OPEN,) if self._tools else ())
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
        if self._norm is not None and (tail := self._norm.flush()):
            out.append(ContentDelta(tail))
        return out

    def parse_all(self, text: str) -> ParsedOutput:
        """Parse a whole output with this (fresh) parser: ``aggregate(feed(text) + finish())``."""
        if self._used or self._finished:
            raise RuntimeError("parse_all() needs a fresh OutputParser")
        return aggregate(self.feed(text) + self.finish())

    def _route(self, events: list) -> list:
        if self._tools is None:
            return events
        out: list = []
        for e in events:
            out += self._tools.feed(e.text) if isinstance(e, ContentDelta) else [e]
        return out

    def _post(self, events: list) -> list:
        if self._norm is None:
            return events
        out: list = []
        for e in events:
            if isinstance(e, ContentDelta):
                if text := self._norm.feed(e.text):
                    out.append(ContentDelta(text))
                continue
            if not isinstance(e, ReasoningDelta) and (tail := self._norm.flush()):
                out.append(ContentDelta(tail))  # a tool-call event ends the current run of content
            out.append(e)
        return out
