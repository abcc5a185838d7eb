"""Split generated text into reasoning (the think block) and content, incrementally.

The chat template ends a generation prompt in ``<think>\\n`` when thinking is enabled, so the generated text starts
*inside* the think block, later emits ``</think>`` (one token), usually ``\\n\\n``, and then the answer. With
thinking disabled the prompt already holds ``<think>\\n\\n</think>\\n\\n`` and the generated text is the answer.

:class:`ReasoningParser` turns arbitrary text deltas into :class:`ReasoningDelta` / :class:`ContentDelta` events:

- reasoning is the text before ``</think>``, without newlines at its start, without one ``<think>`` the model may
  emit itself at the start, and without the newlines right before ``</think>``;
- content is the text after ``</think>``, without its leading newlines;
- a think block that never closes (the output was cut off) is reasoning only;
- an ``ends_at`` tag (``<tool_call>`` when tools are parsed) inside the think block ends it too: the model skipped
  ``</think>``, and the tag and what follows are content;
- when the parser does not start in reasoning, text that begins with ``<think>`` (after optional newlines) opens a
  think block; anything else makes the whole output content, verbatim.

Only what may still change meaning is held back: a possible partial ``<think>`` / ``</think>`` (or end) tag and the newlines
that might precede ``</think>``. Everything else is emitted by the ``feed`` call that completed it.

The escaped-newline option: some outputs contain the two characters backslash + ``n`` where a line break was meant.
:func:`normalize_escaped_newlines` replaces every such pair by a real newline (nothing else is unescaped), and
:class:`EscapedNewlineNormalizer` does the same on a stream (holding back one trailing backslash). The
output parser applies it to content only, never to reasoning or tool arguments.
"""

from __future__ import annotations

from minicpmv.output.events import ContentDelta, ReasoningDelta

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def partial_suffix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper, non-empty prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def normalize_escaped_newlines(text: str) -> str:
    """Turn each literal backslash-n pair (the two characters ``\\`` ``n``) into a real newline.

    Deliberately simple: no other escapes are interpreted and a backslash before the backslash is not special.
    """
    return text.replace("\\n", "\n")


class EscapedNewlineNormalizer:
    """Streaming :func:`normalize_escaped_newlines`: the concatenated output equals the function applied to the
    concatenated input, for any split. A trailing backslash is held until the next delta (or :meth:`flush`)."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, delta: str) -> str:
        text = self._held + delta
        if text.endswith("\\"):
            self._held, text = "\\", text[:-1]
        else:
            self._held = ""
        return normalize_escaped_newlines(text)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


# parser modes
_START = "start"  # not in reasoning yet: a leading <think> may still open a think block
_R_START = "r_start"  # start of reasoning: drop newlines and one optional <think>
_R_BODY = "r_body"  # inside reasoning, waiting for </think>
_C_START = "c_start"  # just after </think>: drop leading newlines
_C_BODY = "c_body"  # content: pass through


class ReasoningParser:
    """Incremental reasoning / content splitter (see the module docstring for the exact rules).

    ``feed(delta)`` returns the events that ``delta`` completed; ``finish()`` returns whatever was held back.
    Concatenating the events' texts gives the same reasoning and content for every way of splitting the output.
    """

    def __init__(self, starts_in_reasoning: bool, *, ends_at: tuple[str, ...] = ()) -> None:
        self._mode = _R_START if starts_in_reasoning else _START
        self._buf = ""
        self._think_seen = False  # one leading <think> has been dropped already
        self._ends_at = ends_at  # tags that end a think block the model forgot to close (they stay in the content)
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """True while the parser is inside a think block (``</think>`` not seen yet)."""
        return self._mode in (_R_START, _R_BODY)

    def feed(self, delta: str) -> list[ReasoningDelta | ContentDelta]:
        if self._finished:
            raise RuntimeError("ReasoningParser.feed() called after finish()")
        out: list[ReasoningDelta | ContentDelta] = []
        if delta:
            self._buf += delta
            self._run(out)
        return out

    def finish(self) -> list[ReasoningDelta | ContentDelta]:
        if self._finished:
            return []
        self._finished = True
        out: list[ReasoningDelta | ContentDelta] = []
        self._run(out)
        buf, self._buf = self._buf, ""
        if self._mode == _START:
            self._content(out, buf)  # only newlines or a partial "<think>": it was content after all
        elif self._mode in (_R_START, _R_BODY):
            self._reasoning(out, buf.rstrip("\n"))  # cut off inside the think block
        # _C_START holds only newlines (dropped); _C_BODY holds nothing
        return out

    # -- internals ------------------------------------------------------------------------------------------

    def _reasoning(self, out: list, text: str) -> None:
        if text:
            out.append(ReasoningDelta(text))

    def _content(self, out: list, text: str) -> None:
        if text:
            out.append(ContentDelta(text))

    def _run(self, out: list) -> None:
        while True:
            buf = self._buf
            mode = self._mode
            if mode == _START:
                rest = buf.lstrip("\n")
                if rest.startswith(THINK_OPEN):
                    self._think_seen = True
                    self._buf = rest[len(THINK_OPEN):]
                    self._mode = _R_START
                    continue
                if THINK_OPEN.startswith(rest):  # "" or a partial "<think>": wait
                    return
                self._mode = _C_BODY
                continue
            if mode == _R_START:
                rest = buf.lstrip("\n")
                self._buf = rest
                if not self._think_seen:
                    if rest.startswith(THINK_OPEN):
                        self._think_seen = True
                        self._buf = rest[len(THINK_OPEN):]
                        continue
                    if THINK_OPEN.startswith(rest):  # "" or a partial "<think>": wait
                        return
                elif not rest:
                    return
                self._mode = _R_BODY
                continue
            if mode == _R_BODY:
                ends = [(buf.find(tag), tag) for tag in (THINK_CLOSE, *self._ends_at)]
                found = [(i, tag) for i, tag in ends if i >= 0]
                if found:
                    i, tag = min(found)
                    self._reasoning(out, buf[:i].rstrip("\n"))
                    if tag == THINK_CLOSE:
                        self._buf, self._mode = buf[i + len(tag):], _C_START
                    else:
                        self._buf, self._mode = buf[i:], _C_BODY
                    continue
                cut = len(buf) - max(partial_suffix_len(buf, tag) for tag in (THINK_CLOSE, *self._ends_at))
                while cut > 0 and buf[cut - 1] == "\n":
                    cut -= 1
                self._reasoning(out, buf[:cut])
                self._buf = buf[cut:]
                return
            if mode == _C_START:
                rest = buf.lstrip("\n")
                self._buf = rest
                if not rest:
                    return
                self._mode = _C_BODY
                continue
            # _C_BODY
            self._buf = ""
            self._content(out, buf)
            return
