"""Parse the model's Qwen3-coder XML tool calls out of generated content, incrementally.

With tools, the chat template asks the model to answer a call as (one or more blocks, optionally after some text)::

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE (may span lines)
    </parameter>
    </function>
    </tool_call>

:class:`ToolCallParser` turns arbitrary text deltas into events (``minicpmv.output.events``): content for text that
is not a call; :class:`ToolCallStart` as soon as ``<function=NAME>`` names one of the tools; an arguments piece each
time a parameter's value is known (``{"city": "Paris"``, then ``, "days": 3``) and ``}`` (or ``{}``) when the call
ends; :class:`ToolCallEnd`. A name that is malformed or not one of the tools leaves the markup as content. Once a
call has started it always ends, so its pieces can be streamed at once and always join to a JSON object.

What real model output gets wrong, and how it is read:

- a missing ``</parameter>`` before the next ``<parameter=`` (on a new line), ``</function>`` or ``</tool_call>``;
  drifted closers (``</parameter1>``, a bare ``</parameter``) close the value like ``</parameter>``;
- a value that contains ``</parameter>``, ``</function>`` or ``<tool_call>`` (source code, XML): a closing tag ends
  the value only where what follows it continues the call (another parameter, the end of the function or call, or
  the end of the output);
- a missing ``</function>`` (``</tool_call>`` or a new call ends it); a ``<function=...>`` with no ``<tool_call>``;
  a call cut off by the end of the output (its finish reason tells the caller it was cut);
- a parameter given twice: the first value is kept (the streamed JSON never has a duplicated key);
- stray text between parameters is skipped.

Values are typed by the tool's JSON schema (:func:`minicpmv.output.tools.convert_parameter`). Whitespace around
calls: the whitespace between text and a call is dropped; whitespace after ``</tool_call>`` is kept only if more text
follows; trailing whitespace at the end of the output is dropped when a call completed, kept otherwise. Every
decision waits until the text that decides it has arrived, so any split of an output gives the same events' sum.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from minicpmv.output.events import ContentDelta, Event, ToolCallArgsDelta, ToolCallEnd, ToolCallStart, new_call_id
from minicpmv.output.reasoning import partial_suffix_len
from minicpmv.output.tools import MAX_NAME_LEN, NAME_END, convert_parameter, dumps_value, index_tools

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
FUNC_OPEN = "<function="
FUNC_CLOSE = "</function>"
PARAM_OPEN = "<parameter="
PARAM_CLOSE = re.compile(r"</parameter\w{0,8}>?")  # </parameter>, and the drifted </parameter1>, </parameter
_WS = " \t\r\n"
# What may follow (after whitespace) a tag that really ends a value / a function.
_AFTER_VALUE = (PARAM_OPEN, FUNC_CLOSE, TOOL_CLOSE, TOOL_OPEN, FUNC_OPEN)
_AFTER_FUNCTION = (TOOL_CLOSE, TOOL_OPEN, FUNC_OPEN)
_BODY_TAGS = (PARAM_OPEN, FUNC_CLOSE, TOOL_CLOSE, TOOL_OPEN, FUNC_OPEN)
_VALUE_ENDS = ("</parameter", PARAM_OPEN, FUNC_CLOSE, TOOL_CLOSE)

_TEXT = "text"  # plain content, looking for <tool_call> (or a bare <function=)
_OPEN = "open"  # after <tool_call>: whitespace, then <function=
_FNAME = "fname"  # reading NAME of <function=NAME>
_BODY = "body"  # inside a started call: parameters, or the end of the function / call
_PNAME = "pname"  # reading KEY of <parameter=KEY>
_PVALUE = "pvalue"  # reading a value up to where it ends
_AFTER = "after"  # after </function>: whitespace, then </tool_call> (or another <function=)


def _continues(text: str, tags: tuple[str, ...], final: bool) -> bool | None:
    """Whether ``text`` (after whitespace) starts with one of ``tags``; the end of the output counts as yes.
    None when the text so far cannot tell."""
    rest = text.lstrip(_WS)
    if any(rest.startswith(t) for t in tags):
        return True
    if not rest or any(t.startswith(rest) for t in tags):
        return True if final else None
    return False


class ToolCallParser:
    """Incremental XML tool-call parser over the content of one output; see the module docstring.

    ``tools`` are OpenAI tool definitions (``{"type": "function", "function": {"name", "parameters"}}``): only their
    names are calls, and their parameter schemas type the values. ``id_factory`` makes call ids.
    """

    def __init__(self, tools: list[dict] | None = None, *, id_factory: Callable[[], str] | None = None) -> None:
        self._schemas = index_tools(tools)
        self._new_id = id_factory or new_call_id
        self._mode = _TEXT
        self._buf = ""  # unprocessed input
        self._pending_ws = ""  # trailing whitespace of the text so far, not emitted yet
        self._raw = ""  # raw text of a call not started yet (it becomes content if the call never starts)
        self._index = 0  # index of the current (or next) call
        self._fn_name = ""
        self._params: set[str] = set()  # parameters of the current call already in its JSON
        self._pname = ""
        self._scan = 0  # where to resume looking for the end of a value in _buf
        self._completed = 0
        self._finished = False

    def feed(self, delta: str) -> list[Event]:
        if self._finished:
            raise RuntimeError("ToolCallParser.feed() called after finish()")
        out: list[Event] = []
        if delta:
            self._buf += delta
            self._run(out, final=False)
        return out

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        self._finished = True
        out: list[Event] = []
        self._run(out, final=True)  # every mode resolves at the end: the buffer is empty, the mode is text
        if self._pending_ws and not self._completed:
            out.append(ContentDelta(self._pending_ws))
        self._pending_ws = ""
        return out

    # -- internals ------------------------------------------------------------------------------------------

    def _run(self, out: list, final: bool) -> None:
        while self._step(out, final):
            pass

    def _text(self, out: list, s: str) -> None:
        """Emit plain text, holding back its trailing whitespace."""
        core = s.rstrip(_WS)
        if core:
            out.append(ContentDelta(self._pending_ws + core))
            self._pending_ws = s[len(core):]
        else:
            self._pending_ws += s

    def _not_a_call(self, out: list) -> bool:
        """The markup read since <tool_call> is not a call: it is content, and parsing goes on after it."""
        self._text(out, self._raw)
        self._raw = ""
        self._mode = _TEXT
        return True

    def _consume(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _skip_ws(self) -> str:
        rest = self._buf.lstrip(_WS)
        self._consume(len(self._buf) - len(rest))
        return rest

    def _read_name(self, final: bool) -> str | bool | None:
        """Read ``NAME>``: the name; False when malformed (left at the offending character); None to wait."""
        buf = self._buf
        m = NAME_END.search(buf, 0, MAX_NAME_LEN + 1)
        if m is None:
            if len(buf) > MAX_NAME_LEN or final:
                self._consume(min(len(buf), MAX_NAME_LEN))
                return False
            return None
        i = m.start()
        name = buf[:i].strip()
        if buf[i] != ">" or not name:
            self._consume(i)
            return False
        self._consume(i + 1)
        return name

    def _end_call(self, out: list) -> None:
        out.append(ToolCallArgsDelta(self._index, "}" if self._params else "{}"))
        out.append(ToolCallEnd(self._index))
        self._index += 1
        self._completed += 1
        self._raw = ""

    def _value_end(self, final: bool) -> tuple[int, int] | None:
        """(where the value ends, where parsing resumes) in the buffer, or None while that cannot be told."""
        buf, i = self._buf, self._scan
        while True:
            i = buf.find("<", i)
            if i < 0:
                self._scan = len(buf)
                return (len(buf), len(buf)) if final else None
            tail = buf[i:]
            decided: bool | None = False
            resume = i
            m = PARAM_CLOSE.match(buf, i)
            if m is not None:
                if m.end() == len(buf) and not final:
                    decided = None  # "</parameter" may still grow into "</parameter>" or "</parameter1>"
                else:
                    decided, resume = _continues(buf[m.end():], _AFTER_VALUE, final), m.end()
            elif tail.startswith(PARAM_OPEN):  # the next parameter, on a line of its own: this one lacked a closer
                if i > 0 and buf[i - 1] == "\n":
                    m = NAME_END.search(buf, i + len(PARAM_OPEN))
                    named = m is not None and buf[m.start()] == ">" and buf[i + len(PARAM_OPEN):m.start()].strip()
                    decided = bool(named) if (m or final) else None
            elif tail.startswith(FUNC_CLOSE):
                decided = _continues(tail[len(FUNC_CLOSE):], _AFTER_FUNCTION, final)
            elif tail.startswith(TOOL_CLOSE):
                decided = _continues(tail[len(TOOL_CLOSE):], (TOOL_OPEN,), final)
            elif not final and any(t.startswith(tail) for t in _VALUE_ENDS):
                decided = None  # a tag still arriving
            if decided is None:
                self._scan = i
                return None
            if decided:
                return i, resume
            i += 1

    def _step(self, out: list, final: bool) -> bool:
        """Advance the machine once; False when it needs more input."""
        mode = self._mode
        if mode == _TEXT:
            buf = self._buf
            starts = [(buf.find(tag), tag) for tag in (TOOL_OPEN, FUNC_OPEN)]
            found = [(i, tag) for i, tag in starts if i >= 0]
            if not found:
                cut = len(buf) if final else len(buf) - max(partial_suffix_len(buf, t) for t in (TOOL_OPEN, FUNC_OPEN))
                self._text(out, buf[:cut])
                self._buf = buf[cut:]
                return False
            i, tag = min(found)
            self._text(out, buf[:i])
            self._raw = self._pending_ws + tag
            self._pending_ws = ""
            self._buf = buf[i + len(tag):]
            self._mode = _OPEN if tag == TOOL_OPEN else _FNAME
            return True

        if mode == _OPEN:
            rest = self._skip_ws()
            if rest.startswith(FUNC_OPEN):
                self._consume(len(FUNC_OPEN))
                self._mode = _FNAME
                return True
            if FUNC_OPEN.startswith(rest) and not final:
                return False
            return self._not_a_call(out)

        if mode == _FNAME:
            name = self._read_name(final)
            if name is None:
                return False
            if name is False or name not in self._schemas:
                return self._not_a_call(out)
            self._fn_name, self._params, self._raw = name, set(), ""
            out.append(ToolCallStart(self._index, self._new_id(), name))
            self._mode = _BODY
            return True

        if mode == _BODY:
            rest = self._buf = self._buf.lstrip(_WS)
            if rest.startswith(PARAM_OPEN):
                self._buf = rest[len(PARAM_OPEN):]
                self._mode = _PNAME
            elif rest.startswith(FUNC_CLOSE):
                self._buf = rest[len(FUNC_CLOSE):]
                self._end_call(out)
                self._mode = _AFTER
            elif rest.startswith(TOOL_CLOSE):  # </function> was missing
                self._buf = rest[len(TOOL_CLOSE):]
                self._end_call(out)
                self._mode = _TEXT
            elif rest.startswith(TOOL_OPEN):  # a new call: this one lacked its closers
                self._end_call(out)
                self._mode = _TEXT
            elif rest.startswith(FUNC_OPEN):
                self._end_call(out)
                self._mode = _TEXT
            elif not rest or any(t.startswith(rest) for t in _BODY_TAGS):
                if not final:
                    return False
                self._buf = ""
                self._end_call(out)  # cut off inside the call
                self._mode = _TEXT
            else:  # stray text inside the call
                nxt = rest.find("<", 1)
                self._buf = rest[nxt:] if nxt > 0 else ""
            return True

        if mode == _PNAME:
            name = self._read_name(final)
            self._raw = ""
            if name is None:
                return False
            if name is False:  # not a parameter after all: skip it as stray text
                self._mode = _BODY
                return True
            self._pname, self._scan = name, 0
            self._mode = _PVALUE
            return True

        if mode == _PVALUE:
            end = self._value_end(final)
            if end is None:
                return False
            stop, resume = end
            raw_value = self._buf[:stop]
            self._buf = self._buf[resume:]
            if self._pname not in self._params:
                schema = self._schemas[self._fn_name].get(self._pname)
                value = dumps_value(convert_parameter(raw_value, schema), raw_value)
                key = json.dumps(self._pname, ensure_ascii=False)
                out.append(ToolCallArgsDelta(self._index, ("{" if not self._params else ", ") + f"{key}: {value}"))
                self._params.add(self._pname)
            self._mode = _BODY
            return True

        # _AFTER
        rest = self._buf = self._buf.lstrip(_WS)
        if rest.startswith(TOOL_CLOSE):
            self._buf = rest[len(TOOL_CLOSE):]
            self._mode = _TEXT
            return True
        if rest.startswith(FUNC_OPEN):  # another call in the same <tool_call>
            self._mode = _TEXT
            return True
        if not final and (not rest or TOOL_CLOSE.startswith(rest) or FUNC_OPEN.startswith(rest)):
            return False
        self._mode = _TEXT  # no </tool_call>: the call stands, the rest is text
        return True
