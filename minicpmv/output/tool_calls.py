"""Parse the model's XML tool calls out of generated content, incrementally.

With tools, the chat template asks the model to answer a call as (one or more blocks, optionally after some text)::

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE (may span lines)
    </parameter>
    </function>
    </tool_call>

:class:`ToolCallParser` turns arbitrary text deltas into events:

- :class:`ContentDelta` for text that is not part of a call;
- :class:`ToolCallStart` (index, generated id ``call_<hex>``, name) as soon as ``<function=NAME>`` is complete;
- :class:`ToolCallArgsDelta` (index, JSON text) each time a parameter closes (``{"city": "Paris"``, then
  ``, "days": 3``) and ``}`` (or ``{}``) at ``</function>``: the concatenation for one call is a JSON object;
- :class:`ToolCallEnd` (index) at ``</function>``: the call is complete;
- :class:`ToolCallAbort` (index) when a started call turns out to be malformed. The call is void; its whole raw text
  (from ``<tool_call>``) follows as a :class:`ContentDelta`, and the next call reuses its index. A server that must never show a void call can hold a
  call's deltas until its ``ToolCallEnd``.

Parameter values are typed by the tool's JSON schema (see :func:`convert_parameter`). Malformed XML never reaches
the arguments: text that cannot be parsed as a call (``<tool_call>`` followed by anything but ``<function=``, a
name containing ``<`` or a newline or longer than 256 characters, text between parameters, a parameter or function
still open at the end) is returned verbatim as content, at ``finish()`` at the latest, and parsing goes on after the
offending character. Lenient spots: a missing ``</tool_call>`` after a complete ``</function>`` is accepted, and a
second ``<function=...>`` inside the same ``<tool_call>`` is another call. A parameter value ends only at
``</parameter>`` (a value may itself contain ``</function>`` or ``<parameter=``).

Whitespace around calls: the whitespace between text and a ``<tool_call>`` that parses, and between ``</function>``
and ``</tool_call>``, is dropped; whitespace after ``</tool_call>`` is kept only if more text follows; trailing
whitespace at the end of the output is dropped when at least one call completed, kept otherwise.

:func:`parse_complete` runs the same machine over a whole text, so the non-streaming result always equals the
aggregation (:func:`collect_tool_calls`) of the streamed events, whatever the chunking.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

from minicpmv.errors import InvalidInputError
from minicpmv.output.reasoning import ContentDelta, partial_suffix_len

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
FUNC_OPEN = "<function="
FUNC_CLOSE = "</function>"
PARAM_OPEN = "<parameter="
PARAM_CLOSE = "</parameter>"
MAX_NAME_LEN = 256
_WS = " \t\r\n"
_NAME_END = re.compile(r"[<>\n]")


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


@dataclass(frozen=True)
class ToolCallAbort:
    """The started call was malformed and is void; its raw text follows as content."""

    kind: ClassVar[str] = "tool_call_abort"
    index: int


ToolEvent = ContentDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd | ToolCallAbort


@dataclass
class ToolCall:
    """One complete tool call; ``arguments_json`` is a JSON object string."""

    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> dict:
        return json.loads(self.arguments_json)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# -- value typing -----------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?\d+")
_NUM_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _json_value(text: str) -> tuple[bool, Any]:
    """Parse JSON text; only values that serialize back to strict JSON count (no NaN, no 1e999 -> inf)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
        json.dumps(value, allow_nan=False)
        return True, value
    except Exception:  # ValueError, RecursionError, ...
        return False, None


def schema_types(schema: Any) -> list[str]:
    """The JSON types a parameter schema allows, in order; [] when unknown (then values are guessed)."""
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    types: list[str] = []
    for key in ("anyOf", "oneOf", "allOf"):
        subs = schema.get(key)
        if isinstance(subs, list):
            for sub in subs:
                types += [x for x in schema_types(sub) if x not in types]
    if types:
        return types
    values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else []
    for v in values:
        name = "null" if v is None else _JSON_TYPES.get(type(v))
        if name and name not in types:
            types.append(name)
    if types:
        return types
    if "properties" in schema:
        return ["object"]
    if "items" in schema:
        return ["array"]
    return []


def _as_type(s: str, t: str) -> tuple[bool, Any]:
    """Try to read the stripped value ``s`` as JSON type ``t``."""
    if t == "null":
        return (True, None) if s in ("null", "None", "none", "NULL") else (False, None)
    if t == "boolean":
        low = s.lower()
        return (True, low == "true") if low in ("true", "false") else (False, None)
    if t in ("integer", "number"):
        try:
            if _INT_RE.fullmatch(s):
                return True, int(s)
            if _NUM_RE.fullmatch(s):
                f = float(s)
                if f != f or f in (float("inf"), float("-inf")):
                    return False, None
                if t == "integer":
                    return (True, int(f)) if f.is_integer() else (False, None)
                return True, f
        except ValueError:  # e.g. more digits than int() accepts
            pass
        return False, None
    if t in ("array", "object"):
        want = list if t == "array" else dict
        ok, v = _json_value(s)
        if ok and isinstance(v, want):
            return True, v
        try:
            v = ast.literal_eval(s)
        except Exception:
            return False, None
        if isinstance(v, tuple) and want is list:
            v = list(v)
        if not isinstance(v, want):
            return False, None
        try:  # normalise to plain JSON values (tuples -> lists, int keys -> strings); sets, bytes... fail
            return _json_value(json.dumps(v, allow_nan=False))
        except Exception:
            return False, None
    return False, None


def convert_parameter(raw: str, schema: Any) -> Any:
    """Type one raw parameter value (the text between ``<parameter=K>`` and ``</parameter>``).

    Exactly one leading and one trailing newline are removed first. Then, by the schema's type(s):
    string -> that text unchanged; integer -> int; number -> int or float; boolean -> true/false (any case);
    null -> null (``null``/``None``); array/object -> JSON, else a Python literal (``ast.literal_eval``).
    With several allowed types, the first that fits wins (string last). A value that fits no allowed type, an
    unknown parameter or a missing schema -> the JSON value if the text is JSON, else the text as a string.
    """
    text = raw[1:] if raw.startswith("\n") else raw
    text = text[:-1] if text.endswith("\n") else text
    types = schema_types(schema)
    s = text.strip()
    for t in types:
        if t != "string":
            ok, v = _as_type(s, t)
            if ok:
                return v
    if "string" in types:
        return text
    ok, v = _json_value(s)
    return v if ok else text


def _dumps(value: Any, fallback: str) -> str:
    """Strict JSON text of ``value``; the JSON string ``fallback`` when it has none."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except Exception:
        return json.dumps(fallback, ensure_ascii=False)


def check_tools(tools: Any) -> None:
    """Refuse a tools list the model could not call: each item is ``{"type": "function", "function": {"name": ...,
    "parameters": {...}}}`` (or the bare function object), with distinct names the call markup can carry."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidInputError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "function"):
            raise InvalidInputError(f"tools[{i}]: only function tools are supported, not type {kind!r}")
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise InvalidInputError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip() or _NAME_END.search(name) or len(name) > MAX_NAME_LEN:
            raise InvalidInputError(f"tools[{i}].function.name must be a non-empty name without '<', '>' or newlines, got {name!r}")
        if name in names:
            raise InvalidInputError(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise InvalidInputError(f"tools[{i}].function.parameters must be a JSON-schema object")


def check_tool_choice(choice: Any) -> None:
    if choice is None or choice in ("auto", "none", "required"):
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(function, dict) and choice.get("type") == "function" and isinstance(function.get("name"), str)):
        raise InvalidInputError("tool_choice must be 'auto', 'none', 'required' or "
                                "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def index_tools(tools: Iterable[dict] | None) -> dict[str, dict]:
    """name -> {parameter name -> schema}, tolerant of incomplete tool definitions."""
    out: dict[str, dict] = {}
    for tool in tools or []:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


# -- the state machine -------------------------------------------------------------------------------------------

_TEXT = "text"  # plain content, looking for <tool_call>
_OPEN = "open"  # after <tool_call>: whitespace, then <function=
_FNAME = "fname"  # reading NAME of <function=NAME>
_BODY = "body"  # inside a function: whitespace, <parameter=...> or </function>
_PNAME = "pname"  # reading KEY of <parameter=KEY>
_PVALUE = "pvalue"  # reading a value up to </parameter>
_AFTER = "after"  # after </function>: whitespace, then </tool_call> (or another <function=)


class ToolCallParser:
    """Incremental XML tool-call parser; see the module docstring for the events and rules.

    ``tools`` are OpenAI tool definitions (``{"type": "function", "function": {"name", "parameters"}}``) used to type
    parameter values; a call to a function not in ``tools`` is still reported, with guessed types.
    ``id_factory`` makes call ids (default ``call_`` + 24 random hex digits).
    """

    def __init__(self, tools: list[dict] | None = None, *, id_factory: Callable[[], str] | None = None) -> None:
        self._schemas = index_tools(tools)
        self._new_id = id_factory or new_call_id
        self._mode = _TEXT
        self._buf = ""  # unprocessed input
        self._pending_ws = ""  # trailing whitespace of the text so far, not emitted yet
        self._raw = ""  # raw text of the call being parsed (from the whitespace before <tool_call>)
        self._next_index = 0
        self._index: int | None = None  # index of the started, unfinished call
        self._fn_name = ""
        self._nparams = 0
        self._pname = ""
        self._scan = 0  # where to resume looking for </parameter> in _buf
        self._completed = 0
        self._used = False
        self._finished = False

    def feed(self, delta: str) -> list[ToolEvent]:
        if self._finished:
            raise RuntimeError("ToolCallParser.feed() called after finish()")
        self._used = True
        out: list[ToolEvent] = []
        if delta:
            self._buf += delta
            self._run(out)
        return out

    def finish(self) -> list[ToolEvent]:
        if self._finished:
            return []
        self._finished = True
        out: list[ToolEvent] = []
        self._run(out)
        if self._mode == _AFTER:  # the call is complete; what is left is a partial tag: text
            self._mode = _TEXT
        if self._mode == _TEXT:
            if self._buf:
                out.append(ContentDelta(self._pending_ws + self._buf))
            elif self._pending_ws and not self._completed:
                out.append(ContentDelta(self._pending_ws))
            self._buf = self._pending_ws = ""
        else:  # a call still open at the end is not a call
            self._raw += self._buf
            self._buf = ""
            self._abort(out)
        return out

    def parse_complete(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Run a fresh parser over a whole output; returns (content or None when empty, complete calls)."""
        if self._used or self._finished:
            raise RuntimeError("parse_complete() needs a fresh ToolCallParser")
        events = self.feed(text) + self.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        return (content or None), collect_tool_calls(events)

    # -- internals ------------------------------------------------------------------------------------------

    def _text(self, out: list, s: str) -> None:
        """Emit plain text, holding back its trailing whitespace."""
        core = s.rstrip(_WS)
        if core:
            out.append(ContentDelta(self._pending_ws + core))
            self._pending_ws = s[len(core):]
        else:
            self._pending_ws += s

    def _abort(self, out: list) -> bool:
        if self._index is not None:
            out.append(ToolCallAbort(self._index))
            self._next_index = self._index  # the next call takes its index: complete calls are numbered 0, 1, ...
            self._index = None
        if self._raw:
            out.append(ContentDelta(self._raw))
        self._raw = ""
        self._mode = _TEXT
        return True

    def _skip_ws(self, keep: bool) -> str:
        buf = self._buf
        rest = buf.lstrip(_WS)
        if keep:
            self._raw += buf[: len(buf) - len(rest)]
        self._buf = rest
        return rest

    def _consume(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _read_name(self) -> str | None | bool:
        """Read ``NAME>`` from the buffer: the name, False when malformed (buffer left at the offending spot),
        None when more input is needed."""
        buf = self._buf
        m = _NAME_END.search(buf, 0, MAX_NAME_LEN + 1)
        if m is None:
            if len(buf) > MAX_NAME_LEN:
                self._consume(MAX_NAME_LEN)
                return False
            return None
        i = m.start()
        name = buf[:i].strip()
        if buf[i] != ">" or not name:
            self._consume(i)
            return False
        self._consume(i + 1)
        return name

    def _run(self, out: list) -> None:
        while self._step(out):
            pass

    def _step(self, out: list) -> bool:
        """Advance the machine once; False when it needs more input."""
        mode = self._mode
        if mode == _TEXT:
            buf = self._buf
            i = buf.find(TOOL_OPEN)
            if i < 0:
                cut = len(buf) - partial_suffix_len(buf, TOOL_OPEN)
                self._text(out, buf[:cut])
                self._buf = buf[cut:]
                return False
            self._text(out, buf[:i])
            self._raw = self._pending_ws + TOOL_OPEN
            self._pending_ws = ""
            self._buf = buf[i + len(TOOL_OPEN):]
            self._mode = _OPEN
            return True

        if mode == _OPEN:
            rest = self._skip_ws(keep=True)
            if rest.startswith(FUNC_OPEN):
                self._consume(len(FUNC_OPEN))
                self._mode = _FNAME
                return True
            if FUNC_OPEN.startswith(rest):
                return False
            return self._abort(out)

        if mode == _FNAME:
            name = self._read_name()
            if name is None:
                return False
            if name is False:
                return self._abort(out)
            self._index = self._next_index
            self._next_index += 1
            self._fn_name = name
            self._nparams = 0
            out.append(ToolCallStart(self._index, self._new_id(), name))
            self._mode = _BODY
            return True

        if mode == _BODY:
            rest = self._skip_ws(keep=True)
            if rest.startswith(PARAM_OPEN):
                self._consume(len(PARAM_OPEN))
                self._mode = _PNAME
                return True
            if rest.startswith(FUNC_CLOSE):
                self._buf = rest[len(FUNC_CLOSE):]
                out.append(ToolCallArgsDelta(self._index, "}" if self._nparams else "{}"))
                out.append(ToolCallEnd(self._index))
                self._index = None
                self._raw = ""
                self._completed += 1
                self._mode = _AFTER
                return True
            if PARAM_OPEN.startswith(rest) or FUNC_CLOSE.startswith(rest):
                return False
            return self._abort(out)

        if mode == _PNAME:
            name = self._read_name()
            if name is None:
                return False
            if name is False:
                return self._abort(out)
            self._pname = name
            self._scan = 0
            self._mode = _PVALUE
            return True

        if mode == _PVALUE:
            buf = self._buf
            i = buf.find(PARAM_CLOSE, self._scan)
            if i < 0:
                self._scan = max(0, len(buf) - len(PARAM_CLOSE) + 1)
                return False
            raw_value = buf[:i]
            self._consume(i + len(PARAM_CLOSE))
            schema = self._schemas.get(self._fn_name, {}).get(self._pname)
            value = convert_parameter(raw_value, schema)
            key = json.dumps(self._pname, ensure_ascii=False)
            text = ("{" if self._nparams == 0 else ", ") + key + ": " + _dumps(value, raw_value)
            out.append(ToolCallArgsDelta(self._index, text))
            self._nparams += 1
            self._mode = _BODY
            return True

        # _AFTER
        rest = self._skip_ws(keep=False)
        if rest.startswith(TOOL_CLOSE):
            self._buf = rest[len(TOOL_CLOSE):]
            self._mode = _TEXT
            return True
        if rest.startswith(FUNC_OPEN):
            self._raw = ""
            self._consume(len(FUNC_OPEN))
            self._mode = _FNAME
            return True
        if not rest or TOOL_CLOSE.startswith(rest) or FUNC_OPEN.startswith(rest):
            return False
        self._mode = _TEXT  # no </tool_call>: the call stands, the rest is text
        return True


def collect_tool_calls(events: Iterable[Any]) -> list[ToolCall]:
    """The complete calls described by a stream of events (started, ended, not aborted), in index order."""
    calls: dict[int, list] = {}
    done: set[int] = set()
    for e in events:
        if isinstance(e, ToolCallStart):
            calls[e.index] = [e.id, e.name, []]
        elif isinstance(e, ToolCallArgsDelta):
            calls[e.index][2].append(e.text)
        elif isinstance(e, ToolCallEnd):
            done.add(e.index)
        elif isinstance(e, ToolCallAbort):
            calls.pop(e.index, None)
            done.discard(e.index)
    return [ToolCall(c[0], c[1], "".join(c[2])) for i, c in sorted(calls.items()) if i in done]


def parse_complete(text: str, tools: list[dict] | None = None, *,
                   id_factory: Callable[[], str] | None = None) -> tuple[str | None, list[ToolCall]]:
    """Non-streaming parse of a whole output: (content or None when empty, complete tool calls)."""
    return ToolCallParser(tools, id_factory=id_factory).parse_complete(text)
