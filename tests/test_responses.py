"""POST /v1/responses through the official openai client's responses.create: text, an image, thinking, a function
call and its output in a follow-up via previous_response_id, streamed and not."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from tests.tiny import png_bytes

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(40, 30)).decode()


@pytest.fixture(scope="module")
def client(live_server):
    return live_server.client


def image_input(text="What is in the image?"):
    return [{"role": "user", "content": [{"type": "input_image", "image_url": IMAGE}, {"type": "input_text", "text": text}]}]


def collect(stream):
    events = list(stream)
    return events, [e.type for e in events]


def test_text_and_image_streamed_and_not_agree(client):
    kw = dict(model="tiny", input=image_input(), instructions="Be brief.", max_output_tokens=6, temperature=0)
    r = client.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and r.output_text
    assert r.usage.output_tokens == 6 and r.usage.input_tokens > 64  # the image's placeholders are in the prompt
    events, types = collect(client.responses.create(stream=True, **kw))
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    # the SDK's strict event accumulator (it wants response.completed: an answer that ends by itself)
    with client.responses.stream(**{**kw, "max_output_tokens": 50}, extra_body={"test_output": "A picture."}) as s:
        assert s.get_final_response().output_text == "A picture."


def test_reasoning_item_with_thinking_on(client):
    out = "<think>\nLet me see.\n</think>\n\nIt is blue."
    kw = dict(model="tiny", input="Colour of the sky?", reasoning={"effort": "low"}, max_output_tokens=50,
              extra_body={"test_output": out})
    r = client.responses.create(**kw)
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text.strip() == "Let me see." and r.output_text.strip() == "It is blue."
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    events, types = collect(client.responses.create(stream=True, **kw))
    assert "response.reasoning_text.delta" in types and types[-1] == "response.completed"
    with client.responses.stream(**kw) as s:
        assert [i.type for i in s.get_final_response().output] == ["reasoning", "message"]
    off = client.responses.create(model="tiny", input="Colour?", reasoning={"effort": "none"}, max_output_tokens=50,
                                  extra_body={"test_output": "Blue."})
    assert [i.type for i in off.output] == ["message"]


@pytest.mark.parametrize("streamed", [False, True])
def test_function_call_then_its_output_via_previous_response_id(live_server, client, streamed):
    kw = dict(model="tiny", tools=[TOOL], max_output_tokens=100, extra_body={"test_output": CALL})
    if streamed:
        events, types = collect(client.responses.create(input=image_input("Weather?"), stream=True, **kw))
        assert "response.function_call_arguments.delta" in types and types[-1] == "response.completed"
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert json.loads(args) == {"city": "Paris", "days": 2}
        first = events[-1].response
        with client.responses.stream(input=image_input("Weather?"), **kw) as s:
            assert s.get_final_response().output[0].type == "function_call"
    else:
        first = client.responses.create(input=image_input("Weather?"), **kw)
    call = next(i for i in first.output if i.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 2}
    assert call.call_id.startswith("call_")
    hits = live_server.llm.engine.stats().prefix_cache_hits
    follow = client.responses.create(
        model="tiny", previous_response_id=first.id, tools=[TOOL], max_output_tokens=8, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp": 21})}],
        extra_body={"test_output": "It is 21 degrees."})
    assert follow.output_text == "It is 21 degrees." and follow.previous_response_id == first.id
    # the follow-up's prompt starts with the first one's: its state came from the prefix cache
    assert live_server.llm.engine.stats().prefix_cache_hits > hits and follow.usage.input_tokens_details.cached_tokens > 0
    assert follow.usage.input_tokens > first.usage.input_tokens
    assert client.responses.retrieve(follow.id).output_text == follow.output_text


def test_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError, match="previous_response_id|no stored"):
        client.responses.create(model="tiny", input="hi", previous_response_id="resp_missing")
    with pytest.raises(openai.BadRequestError, match="text.format"):
        client.responses.create(model="tiny", input="hi", text={"format": {"type": "json_schema", "name": "x",
                                                                         "schema": {"type": "nonsense"}}})
    with pytest.raises(openai.BadRequestError, match="function tools"):
        client.responses.create(model="tiny", input="hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="input_file|unsupported"):
        client.responses.create(model="tiny", input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}])
    with pytest.raises(openai.BadRequestError, match="effort"):
        client.responses.create(model="tiny", input="hi", reasoning={"effort": "huge"})


def test_text_format_json_schema_constrains_the_answer(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
              "additionalProperties": False}
    r = client.responses.create(model="tiny", input="A number, please.", max_output_tokens=30, temperature=0,
                                text={"format": {"type": "json_schema", "name": "number", "schema": schema}})
    assert 0 <= json.loads(r.output_text)["n"] <= 99
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=30, temperature=0,
                                text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(r.output_text), dict)
