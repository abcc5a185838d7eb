"""The tools a request offers: checks that the call markup can carry them, and typing of call parameter values
by each tool's JSON schema."""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Iterable

from minicpmv.errors import InvalidInputError

MAX_NAME_LEN = 256
NAME_END = re.compile(r"[<>\n]")  # a tool or parameter name ends at the first of these

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


def dumps_value(value: Any, fallback: str) -> str:
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
        if not isinstance(name, str) or not name.strip() or NAME_END.search(name) or len(name) > MAX_NAME_LEN:
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
