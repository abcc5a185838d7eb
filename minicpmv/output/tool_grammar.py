"""A Lark grammar (llguidance dialect) that admits exactly this model's Qwen3-coder XML tool calls for given tools.

Used for ``tool_choice: "required"`` or a named function: the prompt already ends with the call's opening markup
(``<tool_call>\\n<function=``, or ``...<function=NAME>\\n`` for a named one), and the grammar continues from there::

    NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

Parameters come in the schema's ``properties`` order; required ones always, optional ones may be left out; no
other names. A value is typed as the output parser reads it (``convert_parameter``): string parameters are raw text
(an ``enum`` of strings is one of them; a ``pattern`` is matched; ``minLength``/``maxLength`` bound it; raw values
never contain ``<``, so a value cannot end the call early), every other type is compact JSON that satisfies the
parameter's schema (llguidance's JSON-schema support, inlined with ``%json``).
"""

from __future__ import annotations

import json
from typing import Any

from minicpmv.output.tools import schema_types

JSON_INLINE_OPTIONS = {"whitespace_flexible": False}


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _string_value(schema: dict) -> str:
    """A Lark item for a raw string value followed by the newline before ``</parameter>``."""
    enum = schema.get("enum") if isinstance(schema.get("enum"), list) else (
        [schema["const"]] if "const" in schema else None)
    if enum is not None:
        strings = [v for v in enum if isinstance(v, str)]
        if strings:
            return "(" + " | ".join(_lit(v + "\n") for v in strings) + ")"
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and pattern:
        body = pattern[1:] if pattern.startswith("^") else pattern
        body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
        return "/(" + body.replace("/", "\\/") + ")\\n/"
    low = schema.get("minLength") if isinstance(schema.get("minLength"), int) else 0
    high = schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else None
    bound = f"{{{low},{high}}}" if high is not None else (f"{{{low},}}" if low else "*")
    return f"/[^<]{bound}\\n/"


def _value(schema: Any, defs: dict) -> str:
    schema = schema if isinstance(schema, dict) else {}
    types = schema_types(schema)
    if "string" in types:
        return _string_value(schema)
    inline = {**defs, **schema, "x-guidance": JSON_INLINE_OPTIONS}  # "#/$defs/..." refs resolve inside the value
    return "%json " + json.dumps(inline, ensure_ascii=False) + ' "\\n"'


def _function(name: str, fn: dict, i: int, rules: list[str]) -> str:
    """Rules for one function's parameters; returns the rule name of its body (parameters + closing)."""
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    required = set(params.get("required") or []) if isinstance(params.get("required"), list) else set()
    defs = {k: params[k] for k in ("$defs", "definitions") if isinstance(params.get(k), dict)}
    items = []
    for j, (key, schema) in enumerate(props.items()):
        rule = f"p_{i}_{j}"
        rules.append(f"{rule}: {_lit(f'<parameter={key}>' + chr(10))} {_value(schema, defs)} {_lit('</parameter>' + chr(10))}")
        items.append(rule if key in required else f"{rule}?")
    body = f"body_{i}"
    rules.append(f"{body}: {' '.join(items)} {_lit('</function>' + chr(10))} </tool_call>")
    return body


def tool_call_grammar(tools: list[dict], choice: str | dict, parallel: bool = True) -> str:
    """The Lark grammar for the rest of a forced call (see the module docstring); ``parallel`` admits more calls
    after the first, each written the way the chat template writes them."""
    functions = []
    for tool in tools:
        fn = tool.get("function", tool)
        functions.append((fn["name"], fn))
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if named is not None:
        functions = [(n, f) for n, f in functions if n == named]
    rules: list[str] = []
    heads = []
    for i, (name, fn) in enumerate(functions):
        body = _function(name, fn, i, rules)
        heads.append((name, body))
    if named is not None:
        first = heads[0][1]
        again = f"{_lit(chr(10))} <tool_call> {_lit(chr(10) + '<function=' + named + '>' + chr(10))} {first}"
    else:
        rules.append("call: " + " | ".join(f"{_lit(name + '>' + chr(10))} {body}" for name, body in heads))
        first = "call"
        again = f"{_lit(chr(10))} <tool_call> {_lit(chr(10) + '<function=')} call"
    start = f"start: {first}" + (" more*" if parallel else "")
    lines = [start, *rules]
    if parallel:
        lines.append(f"more: {again}")
    return "\n".join(lines)

