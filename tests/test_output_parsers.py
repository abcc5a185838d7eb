"""Reasoning / content / tool-call output parsers: unit cases and stream-vs-whole property tests (pure Python)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minicpmv.output.events import (
    ContentDelta,
    ParsedOutput,
    ReasoningDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    aggregate,
)
from minicpmv.output.parser import OutputParser
from minicpmv.output.reasoning import EscapedNewlineNormalizer, ReasoningParser, normalize_escaped_newlines
from minicpmv.output.tool_calls import ToolCallParser
from minicpmv.output.tools import convert_parameter

WS = " \t\r\n"

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "temp": {"type": "number"},
            "metric": {"type": "boolean"},
            "note": {"type": "null"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "opts": {"type": "object"},
            "maybe": {"type": ["string", "null"]},
        },
        "required": ["city"],
    }}},
    {"type": "function", "function": {"name": "run_code", "parameters": {
        "type": "object",
        "properties": {
            "code": {"type": "string"},
            "config": {"type": "object", "properties": {"limits": {"type": "object"}}},
            "retries": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "mode": {"enum": ["fast", "slow"]},
        },
    }}},
    {"type": "function", "function": {"name": "now"}},
]
SCHEMA_TYPES = {
    "get_weather": {"city": "string", "days": "integer", "temp": "number", "metric": "boolean", "note": "null",
                    "tags": "array", "opts": "object", "maybe": "string_or_null"},
    "run_code": {"code": "string", "config": "object", "retries": "integer_or_null", "mode": "string"},
}


def counter_ids():
    c = itertools.count()
    return lambda: f"call_{next(c):04x}"


def render_call(name: str, args: dict, renders: dict | None = None) -> str:
    out = f"<tool_call>\n<function={name}>\n"
    for k, v in args.items():
        text = renders[k] if renders and k in renders else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        out += f"<parameter={k}>\n{text}\n</parameter>\n"
    return out + "</function>\n</tool_call>"


def parse_all(text: str, thinking: bool, tools=None, *, normalize_newlines=False, id_factory=None) -> ParsedOutput:
    return OutputParser(thinking, tools, normalize_newlines=normalize_newlines, id_factory=id_factory).parse_all(text)


def parse_complete(text: str, tools, id_factory=None) -> tuple[str | None, list]:
    """The tool-call parser alone over a whole text: (content, complete calls)."""
    p = aggregate(run_stream(ToolCallParser(tools, id_factory=id_factory), [text]))
    return p.content, p.tool_calls


def run_stream(parser, chunks):
    events = []
    for c in chunks:
        events += parser.feed(c)
    return events + parser.finish()


def split(text: str, cuts) -> list[str]:
    cuts = sorted(set(c for c in cuts if 0 < c < len(text)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def strip_ids(p: ParsedOutput):
    return p.reasoning, p.content, [(c.name, c.arguments_json) for c in p.tool_calls]


# ------------------------------------------------------------------------------------------------ reasoning

def test_thinking_on():
    p = parse_all("Let me see.\nStep 2.\n\n</think>\n\nThe answer is 4.", True)
    assert (p.reasoning, p.content, p.tool_calls) == ("Let me see.\nStep 2.", "The answer is 4.", [])


def test_thinking_off_everything_is_content():
    text = "Hello.\n</think> is just text here <think>too</think>\n"
    p = parse_all(text, False)
    assert (p.reasoning, p.content) == (None, text)


def test_truncated_thinking_is_reasoning_only():
    p = parse_all("I am still thinking about\n\n", True)
    assert (p.reasoning, p.content) == ("I am still thinking about", None)
    p = parse_all("thinking </thi", True)  # a partial tag at the very end is text
    assert (p.reasoning, p.content) == ("thinking </thi", None)


def test_model_emitted_think_tag():
    p = parse_all("<think>\nhmm\n</think>\n\nok", True)
    assert (p.reasoning, p.content) == ("hmm", "ok")
    p = parse_all("\n<think>\nhmm\n</think>\n\nok", False)
    assert (p.reasoning, p.content) == ("hmm", "ok")
    # only one leading <think> is removed; a later one is reasoning text
    p = parse_all("<think><think>x</think>y", True)
    assert (p.reasoning, p.content) == ("<think>x", "y")


def test_empty_reasoning():
    p = parse_all("\n</think>\n\nAnswer", True)
    assert (p.reasoning, p.content) == (None, "Answer")


def test_reasoning_holds_back_only_the_minimum():
    r = ReasoningParser(True)
    assert r.feed("abc") == [ReasoningDelta("abc")]
    assert r.feed("\n\n") == []  # might precede </think>
    assert r.feed("</thi") == []
    assert r.feed("s") == [ReasoningDelta("\n\n</this")]
    assert r.feed("</think>") == []
    assert r.feed("\n\n") == []
    assert r.feed("Hi") == [ContentDelta("Hi")]
    assert r.feed("\n") == [ContentDelta("\n")]  # content is never held
    assert r.finish() == []
    with pytest.raises(RuntimeError):
        r.feed("x")


def test_not_in_reasoning_waits_only_for_a_possible_think():
    r = ReasoningParser(False)
    assert r.feed("<th") == []
    assert r.feed("e") == [ContentDelta("<the")]
    r = ReasoningParser(False)
    assert r.feed("Hello") == [ContentDelta("Hello")]


# -------------------------------------------------------------------------------------- escaped newlines

def test_normalize_escaped_newlines():
    assert normalize_escaped_newlines(r"a\nb\n\nc") == "a\nb\n\nc"
    assert normalize_escaped_newlines("real\nnewline") == "real\nnewline"
    n = EscapedNewlineNormalizer()
    assert n.feed("x\\") == "x"
    assert n.feed("ny") == "\ny"
    assert n.feed("\\") == ""
    assert n.flush() == "\\"


def test_normalize_flag_touches_content_only():
    p = parse_all("r\\n1\n</think>\n\nline1\\nline2", True, normalize_newlines=True)
    assert (p.reasoning, p.content) == ("r\\n1", "line1\nline2")
    events = run_stream(OutputParser(True, normalize_newlines=True), list("x</think>a\\nb\\"))
    assert aggregate(events).content == "a\nb\\"
    text = "See\\nbelow" + render_call("run_code", {"code": 'print("a\\nb")'})
    p = parse_all(text, False, TOOLS, normalize_newlines=True)
    assert p.content == "See\nbelow"
    assert p.tool_calls[0].arguments == {"code": 'print("a\\nb")'}


@given(st.text(alphabet="\\na\n", max_size=30), st.lists(st.integers(0, 30), max_size=8))
@settings(max_examples=200, deadline=None)
def test_normalizer_stream_equals_function(text, cuts):
    n = EscapedNewlineNormalizer()
    assert "".join(n.feed(c) for c in split(text, cuts)) + n.flush() == normalize_escaped_newlines(text)


# -------------------------------------------------------------------------------------------- tool calls

def test_one_call_streams_start_then_fragments():
    text = render_call("get_weather", {"city": "Paris", "days": 3})
    parser = ToolCallParser(TOOLS, id_factory=counter_ids())
    events, fed = [], ""
    for ch in text:
        fed += ch
        new = parser.feed(ch)
        if any(isinstance(e, ToolCallStart) for e in new):  # as soon as the name is complete
            assert events == [] and fed.endswith("<function=get_weather>")
        if any(isinstance(e, ToolCallArgsDelta) for e in new):  # once the tag after a value shows it ended
            assert fed.endswith(("</parameter>\n<parameter=", "</parameter>\n</function>", "</function>"))
        events += new
    events += parser.finish()
    assert events == [
        ToolCallStart(0, "call_0000", "get_weather"),
        ToolCallArgsDelta(0, '{"city": "Paris"'),
        ToolCallArgsDelta(0, ', "days": 3'),
        ToolCallArgsDelta(0, "}"),
        ToolCallEnd(0),
    ]
    content, calls = parse_complete(text, TOOLS)
    assert content is None and len(calls) == 1
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 5 + 24
    assert (calls[0].name, calls[0].arguments) == ("get_weather", {"city": "Paris", "days": 3})


def test_two_calls_and_text_before_and_after():
    text = ("I'll check both.\n\n" + render_call("get_weather", {"city": "Paris"}) + "\n"
            + render_call("get_weather", {"city": "Rome", "days": 2}) + "\n\nDone.\n")
    content, calls = parse_complete(text, TOOLS, id_factory=counter_ids())
    assert content == "I'll check both.\n\nDone."
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_0000", "get_weather", {"city": "Paris"}),
        ("call_0001", "get_weather", {"city": "Rome", "days": 2}),
    ]


def test_call_without_parameters_and_after_thinking():
    text = "plan\n</think>\n\n<tool_call>\n<function=now>\n</function>\n</tool_call>"
    p = parse_all(text, True, TOOLS)
    assert (p.reasoning, p.content) == ("plan", None)
    assert [(c.name, c.arguments_json) for c in p.tool_calls] == [("now", "{}")]


def test_every_json_type():
    args_text = {
        "city": "\nLine one\n  indented <b>\n\n",  # string: only one newline removed at each end
        "days": "7", "temp": "21.5", "metric": "True", "note": "None",
        "tags": '["a", "b"]', "opts": '{"x": {"y": [1, 2.5, null, true]}}', "maybe": "null",
    }
    text = "<tool_call>\n<function=get_weather>\n" + "".join(
        f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args_text.items()) + "</function>\n</tool_call>"
    _, calls = parse_complete(text, TOOLS)
    assert calls[0].arguments == {
        "city": "\nLine one\n  indented <b>\n\n", "days": 7, "temp": 21.5, "metric": True, "note": None,
        "tags": ["a", "b"], "opts": {"x": {"y": [1, 2.5, None, True]}}, "maybe": None,
    }
    args = json.loads(calls[0].arguments_json)
    assert type(args["days"]) is int and type(args["temp"]) is float


@pytest.mark.parametrize("raw,schema,expected", [
    ("\n42\n", {"type": "integer"}, 42),
    ("\n-3.0\n", {"type": "integer"}, -3),
    ("\n12\n", {"type": "number"}, 12),
    ("\n1e-3\n", {"type": "number"}, 0.001),
    ("\nfalse\n", {"type": "boolean"}, False),
    ("\nTRUE\n", {"type": "boolean"}, True),
    ("\nnull\n", {"type": "null"}, None),
    ("\n42\n", {"type": "string"}, "42"),
    ("42", {"type": "string"}, "42"),
    ("\n['a', 'b', None, True]\n", {"type": "array"}, ["a", "b", None, True]),  # Python literal fallback
    ("\n{'k': (1, 2)}\n", {"type": "object"}, {"k": [1, 2]}),
    ("\n[1, 2\n", {"type": "array"}, "[1, 2"),  # neither JSON nor a literal: the raw string
    ("\nabc\n", {"type": "integer"}, "abc"),  # does not fit the schema: guessed
    ("\nnan\n", {"type": "number"}, "nan"),
    ("\n1e999\n", {"type": "number"}, "1e999"),
    ("\n{\"a\": 1}\n", None, {"a": 1}),  # no schema: JSON if it is JSON
    ("\n3\n", None, 3),
    ("\nhello world\n", None, "hello world"),
    ("\nNaN\n", None, "NaN"),
    ("\n5\n", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 5),
    ("\nNone\n", {"type": ["integer", "null"]}, None),
    ("\nfast\n", {"enum": ["fast", "slow"]}, "fast"),
    ("\n{\"x\": 1}\n", {"properties": {"x": {}}}, {"x": 1}),
])
def test_convert_parameter(raw, schema, expected):
    v = convert_parameter(raw, schema)
    assert v == expected and type(v) is type(expected)


def test_unknown_tool_stays_text_unknown_parameter_is_guessed():
    text = render_call("not_a_tool", {"a": "1"})
    assert parse_complete(text, TOOLS) == (text, [])
    _, calls = parse_complete(render_call("get_weather", {"city": "7", "extra": "7"}), TOOLS)
    assert calls[0].arguments == {"city": "7", "extra": 7}


# ------------------------------------------------------------------------------------------ malformed XML

NOT_CALLS = [
    "<tool_call>\n<function=get_wea",  # cut inside the name
    "<tool_call>\n",
    # <function= without '>'
    "<tool_call>\n<function=get_weather\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    # Hermes-style JSON instead of XML
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    # empty, overlong, invalid and unknown names
    "<tool_call>\n<function=>\n</function>\n</tool_call>",
    "<tool_call>\n<function=" + "f" * 300 + ">\n</function>\n</tool_call>",
    "<tool_call>\n<function=get weather>\n</function>\n</tool_call>",
    "<function=nope>\n<parameter=city>\nParis\n</parameter>\n</function>",
]


@pytest.mark.parametrize("text", NOT_CALLS)
def test_markup_that_names_no_tool_stays_text(text):
    assert parse_complete(text, TOOLS) == (text, [])
    for cuts in (range(len(text)), [len(text) // 2], []):
        events = run_stream(ToolCallParser(TOOLS), split(text, cuts))
        assert not any(isinstance(e, ToolCallStart) for e in events)  # nothing was started, so nothing taken back
        assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == text


CODE = 'if a </parameter> b:\n    x = "</function>"\n    y = "<tool_call>"\n</parameter>x'
# (output, content, [(name, arguments)]): what real model output gets wrong, and what it meant
RECOVERED = [
    # </parameter> missing before the next parameter / before </function> / before </tool_call>
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</parameter>\n</function>\n"
     "</tool_call>", None, [("get_weather", {"city": "Paris", "days": 3})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>", None,
     [("get_weather", {"city": "Paris"})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</tool_call>", None,
     [("get_weather", {"city": "Paris"})]),
    # drifted closers
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter1>\n<parameter=days>\n3\n</parameter\n"
     "</function>\n</tool_call>", None, [("get_weather", {"city": "Paris", "days": 3})]),
    # values holding closing tags that do not continue the call
    (render_call("run_code", {"code": CODE}), None, [("run_code", {"code": CODE})]),
    ("<tool_call>\n<function=run_code>\n<parameter=code>\n<tool_call>\n<function=x>\n</parameter>\n</function>\n"
     "</tool_call>", None, [("run_code", {"code": "<tool_call>\n<function=x>"})]),
    # </function> missing before </tool_call>, or before the next call
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>", None,
     [("get_weather", {"city": "Paris"})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n<tool_call>\n<function=now>\n"
     "</function>\n</tool_call>", None, [("get_weather", {"city": "A"}), ("now", {})]),
    # no <tool_call> opener
    ("Sure.\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>", "Sure.",
     [("get_weather", {"city": "Paris"})]),
    # the same parameter twice: the first value stays, one key
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n<parameter=city>\nB\n</parameter>\n"
     "</function>\n</tool_call>", None, [("get_weather", {"city": "A"})]),
    # stray text before a parameter is skipped (after a closer it would continue the value); so is a malformed name
    ("<tool_call>\n<function=get_weather>\noops\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
     None, [("get_weather", {"days": 2})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=ci\nty>\nParis\n</parameter>\n</function>\n</tool_call>", None,
     [("get_weather", {})]),
    # cut off inside a value / inside the body: the call ends with what it has
    ("Text\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", "Text", [("get_weather", {"city": "Par"})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=days>\n4\n</parameter>\n", None, [("get_weather", {"days": 4})]),
    # a valid call after markup that named no tool
    ("<tool_call>\n<function=nope>\n</tool_call>" + render_call("get_weather", {"city": "Oslo"}),
     "<tool_call>\n<function=nope>\n</tool_call>", [("get_weather", {"city": "Oslo"})]),
]


@pytest.mark.parametrize("text,content,calls", RECOVERED)
def test_recovered_calls_whole_and_streamed(text, content, calls):
    for chunks in ([text], list(text), split(text, range(0, len(text), 7)), split(text, range(3, len(text), 11))):
        events = run_stream(ToolCallParser(TOOLS, id_factory=counter_ids()), chunks)
        p = aggregate(events)
        assert (p.content, [(c.name, c.arguments) for c in p.tool_calls]) == (content, calls)
        for i, (_, args) in enumerate(calls):  # streamed fragments join to the call's JSON object
            assert json.loads("".join(e.text for e in events if isinstance(e, ToolCallArgsDelta) and e.index == i)) == args
        assert [e.index for e in events if isinstance(e, ToolCallStart)] == list(range(len(calls)))


def test_lenient_missing_tool_call_close():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
    content, calls = parse_complete(text, TOOLS)
    assert content is None and calls[0].arguments == {"city": "Paris"}


def test_tool_xml_stays_content_without_tools():
    text = "Sure.\n\n" + render_call("get_weather", {"city": "Paris"})
    for p in (parse_all(text, False, None), parse_all(text, False, [])):
        assert (p.content, p.tool_calls) == (text, [])
    assert not OutputParser(False, []).parses_tools


def test_tool_call_inside_unclosed_thinking_ends_it():
    call = render_call("get_weather", {"city": "Paris"})
    for chunks in ([f"I should look it up.\n{call}"], list(f"I should look it up.\n{call}")):
        p = aggregate(run_stream(OutputParser(True, TOOLS), chunks))
        assert (p.reasoning, p.content) == ("I should look it up.", None)
        assert [(c.name, c.arguments) for c in p.tool_calls] == [("get_weather", {"city": "Paris"})]
    p = parse_all(f"plan {call}", True, None)  # without tools the tag is just reasoning text
    assert (p.reasoning, p.tool_calls) == (f"plan {call}", [])


def test_parse_all_needs_a_fresh_parser():
    o = OutputParser(False, TOOLS)
    o.feed("x")
    with pytest.raises(RuntimeError):
        o.parse_all("y")


# --------------------------------------------------------------------------------- property tests

FRAGMENTS = ["a", "b", " ", "\n", "\n\n", "<", ">", "/", "=", "\\n", "é", "中", "<tool", "_call>", "</tool_call>",
             "<think", "</think", "think>", "<function=", "</function>", "<parameter=x>", "</parameter>", "\t"]
text_st = st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join)
plain_st = st.text(alphabet="ab <>/=\\n\n\"'{}[]:,é", max_size=20)
json_scalar = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
               | st.floats(allow_nan=False, allow_infinity=False) | plain_st)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3)
                          | st.dictionaries(plain_st, c, max_size=3), max_leaves=8)
NULL_WORDS = {"null", "None", "none", "NULL"}


@st.composite
def typed_value(draw, kind):
    """(value, rendered text) for one schema kind, rendered the way the chat template renders past calls."""
    if kind == "string":
        v = draw(st.text(alphabet="ab <>/=\\n\n\t\"'é中", max_size=30) | text_st)
        return v, v
    if kind == "integer":
        v = draw(st.integers(-10**15, 10**15))
        return v, str(v)
    if kind == "number":
        v = draw(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**6, 10**6))
        return v, str(v)
    if kind == "boolean":
        v = draw(st.booleans())
        return v, draw(st.sampled_from([str(v), str(v).lower()]))
    if kind == "null":
        return None, draw(st.sampled_from(["None", "null"]))
    if kind == "array":
        v = draw(st.lists(json_value, max_size=4))
        return v, json.dumps(v, ensure_ascii=draw(st.booleans()))
    if kind == "object":
        v = draw(st.dictionaries(plain_st, json_value, max_size=4))
        return v, json.dumps(v, ensure_ascii=draw(st.booleans()))
    if kind == "string_or_null":
        if draw(st.booleans()):
            return None, draw(st.sampled_from(["None", "null"]))
        v = draw(st.text(alphabet="ab <\n", max_size=10).filter(lambda s: s.strip() not in NULL_WORDS))
        return v, v
    assert kind == "integer_or_null"
    return draw(st.sampled_from([(None, "None"), (None, "null"), (5, "5"), (-12, "-12")]))


@st.composite
def tool_call_st(draw):
    name = draw(st.sampled_from(sorted(SCHEMA_TYPES)))
    keys = draw(st.permutations(sorted(SCHEMA_TYPES[name])))
    keys = keys[: draw(st.integers(0, len(keys)))]
    args, renders = {}, {}
    for k in keys:
        v, r = draw(typed_value(SCHEMA_TYPES[name][k]))
        if any(tag in r for tag in ("</parameter", "<parameter=", "</function>", "</tool_call>")):
            continue  # tags inside values: test_recovered_calls_whole_and_streamed and test_values_with_tags
        args[k], renders[k] = v, r
    return name, args, render_call(name, args, renders)


def _no_call_tag(text: str) -> str:
    while "<tool_call>" in text:
        text = text.replace("<tool_call>", "")
    return text


@st.composite
def output_st(draw):
    """A generated output and the (reasoning, content, [(name, args)]) it should give."""
    thinking = draw(st.booleans())
    before = _no_call_tag(draw(text_st | plain_st))
    if not thinking and before.lstrip("\n").startswith("<think>"):
        before = "x" + before  # would open a think block
    calls = draw(st.lists(tool_call_st(), max_size=3))
    after = _no_call_tag(draw(text_st | plain_st)) if calls else ""
    answer = before
    if calls:
        answer += draw(st.sampled_from(["", "\n", "\n\n", " \n"])) if before else ""
        answer += draw(st.sampled_from(["", "\n", "\n\n"])).join(c[2] for c in calls) + after
    expected_reasoning = None
    text = answer
    if thinking:
        reasoning = _no_call_tag(draw(text_st | plain_st))
        if "</think>" in reasoning or reasoning.lstrip("\n").startswith("<think>"):
            reasoning = "plain"
        prefix = draw(st.sampled_from(["", "<think>\n"]))
        expected_reasoning = reasoning.strip("\n") or None
        if draw(st.integers(0, 9)) == 0:  # cut off inside the think block
            return prefix + reasoning, True, (expected_reasoning, None, [])
        text = prefix + reasoning + "\n</think>\n\n" + answer
        answer = answer.lstrip("\n")  # content starts after the newlines that follow </think>
        before = before.lstrip("\n")
    if calls:
        content = before.rstrip(WS) + (after.rstrip(WS) if after.strip(WS) else "")
    else:
        content = answer
    return text, thinking, (expected_reasoning, content or None, [(n, a) for n, a, _ in calls])


def check_result(result: ParsedOutput, expected):
    exp_reasoning, exp_content, exp_calls = expected
    assert result.reasoning == exp_reasoning
    assert result.content == exp_content
    assert [(c.name, json.loads(c.arguments_json)) for c in result.tool_calls] == exp_calls


@given(output_st(), st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stream_equals_whole_equals_expected(case, data):
    text, thinking, expected = case
    whole = parse_all(text, thinking, TOOLS, id_factory=counter_ids())
    check_result(whole, expected)
    if data.draw(st.booleans()):
        chunks = list(text)
    else:
        chunks = split(text, data.draw(st.lists(st.integers(0, len(text)), max_size=25)))
    events = run_stream(OutputParser(thinking, TOOLS, id_factory=counter_ids()), chunks)
    assert all(e.text for e in events if isinstance(e, (ContentDelta, ReasoningDelta, ToolCallArgsDelta)))
    streamed = aggregate(events)
    assert streamed == whole  # same ids too (deterministic factory)
    for i, (_, args) in enumerate(expected[2]):  # each call's fragments concatenate to its JSON object
        frags = [e.text for e in events if isinstance(e, ToolCallArgsDelta) and e.index == i]
        assert json.loads("".join(frags)) == args
        assert ToolCallEnd(i) in events


@given(st.lists(st.sampled_from(FRAGMENTS + ["<tool_call>", "\n<function=f>\n", "<parameter=k>\n1\n</parameter>",
                                             "\n<function=get_weather>\n", "<parameter=days>", "</tool_call>"]),
                max_size=30).map("".join), st.booleans(), st.lists(st.integers(0, 200), max_size=30), st.booleans())
@settings(max_examples=200, deadline=None)
def test_tag_soup_never_breaks(text, thinking, cuts, one_char):
    chunks = list(text) if one_char else split(text, cuts)
    events = run_stream(ToolCallParser(TOOLS, id_factory=counter_ids()), chunks)
    content, calls = parse_complete(text, TOOLS, id_factory=counter_ids())
    assert aggregate(events) == ParsedOutput(None, content, calls)
    for c in calls:
        assert isinstance(json.loads(c.arguments_json), dict)
    if not any(isinstance(e, ToolCallStart) for e in events):  # no call: every character comes back as content
        assert (content or "") == text
    whole = parse_all(text, thinking, TOOLS, id_factory=counter_ids())
    assert aggregate(run_stream(OutputParser(thinking, TOOLS, id_factory=counter_ids()), chunks)) == whole
    assert strip_ids(parse_all(text, thinking, None)) == strip_ids(
        aggregate(run_stream(OutputParser(thinking, None), chunks)))


def reference_split(text: str, starts_in_reasoning: bool):
    """Straightforward whole-text version of the reasoning rules."""
    seen = False
    if not starts_in_reasoning:
        rest = text.lstrip("\n")
        if not rest.startswith("<think>"):
            return None, text or None
        text, seen = rest[len("<think>"):], True
    t = text.lstrip("\n")
    if not seen and t.startswith("<think>"):
        t = t[len("<think>"):].lstrip("\n")
    i = t.find("</think>")
    if i < 0:
        return t.rstrip("\n") or None, None
    return t[:i].rstrip("\n") or None, t[i + len("</think>"):].lstrip("\n") or None


@given(st.lists(st.sampled_from(["a", "\n", "<think>", "</think>", "<", "</", "</thi", "nk>", "<th", "x\n"]),
                max_size=15).map("".join), st.booleans(), st.lists(st.integers(0, 80), max_size=20))
@settings(max_examples=200, deadline=None)
def test_reasoning_parser_matches_reference(text, starts, cuts):
    for chunks in (split(text, cuts), list(text)):
        p = aggregate(run_stream(ReasoningParser(starts), chunks))
        assert (p.reasoning, p.content) == reference_split(text, starts)


def test_event_kinds():
    assert [e.kind for e in (ReasoningDelta("r"), ContentDelta("c"), ToolCallStart(0, "call_0", "f"),
                             ToolCallArgsDelta(0, "{}"), ToolCallEnd(0))] == [
        "reasoning", "content", "tool_call_start", "tool_call_args", "tool_call_end"]
    assert ContentDelta("a") == ContentDelta("a") and ContentDelta("a") != ReasoningDelta("a")


code_st = st.lists(st.sampled_from(["x", " ", "\n", "</parameter>x", "</function>y", "</tool_call>z", "<tool_call>",
                                    "<parameter", "</param", "é"]), max_size=12).map("".join)


@given(code_st, st.lists(st.integers(0, 200), max_size=20))
@settings(max_examples=200, deadline=None)
def test_values_with_tags(code, cuts):
    """A closing tag inside a value that is not followed by more of the call stays in the value, for any split."""
    text = render_call("run_code", {"code": code}) + "\nafter"
    for chunks in (split(text, cuts), list(text)):
        p = aggregate(run_stream(ToolCallParser(TOOLS), chunks))
        assert [(c.name, c.arguments) for c in p.tool_calls] == [("run_code", {"code": code})]
        assert p.content == "\nafter"
