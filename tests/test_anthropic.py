"""Anthropic's POST /v1/messages through the official anthropic client: messages.create and messages.stream with an
image, a tool use and its result, thinking blocks, stop sequences, x-api-key auth and Anthropic error bodies."""

from __future__ import annotations

import json

import base64

import anthropic
import pytest

from tests.tiny import KEY, png_bytes

TOOL = {"name": "get_weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png_bytes(40, 30)).decode()}}


@pytest.fixture(scope="module")
def client(live_server):
    return anthropic.Anthropic(base_url=live_server.url, api_key=KEY, max_retries=0, timeout=60)


def user(*blocks):
    return [{"role": "user", "content": list(blocks)}]


def test_create_and_stream_agree_with_an_image(client):
    kw = dict(model="tiny", max_tokens=6, system="Be brief.", extra_body={"temperature": 0},
              messages=user(IMAGE, {"type": "text", "text": "What is this?"}))
    m = client.messages.create(**kw)
    assert m.stop_reason == "max_tokens" and m.content[0].type == "text" and m.usage.output_tokens == 6
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 64  # the image's placeholders
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text == final.content[0].text and final.stop_reason == "max_tokens"
    counted = client.messages.count_tokens(model="tiny", system="Be brief.", messages=kw["messages"])
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_use_with_thinking_then_its_result(client, streamed):
    out = "<think>\nNeed the weather.\n</think>\n\n" + CALL
    kw = dict(model="tiny", max_tokens=200, tools=[TOOL], thinking={"type": "enabled", "budget_tokens": 100},
              messages=user(IMAGE, {"type": "text", "text": "Weather where this was taken?"}), extra_body={"test_output": out})
    if streamed:
        with client.messages.stream(**kw) as stream:
            kinds = [e.type for e in stream]
            m = stream.get_final_message()
        assert kinds[0] == "message_start" and "content_block_delta" in kinds and kinds[-1] == "message_stop"
    else:
        m = client.messages.create(**kw)
    assert [b.type for b in m.content] == ["thinking", "tool_use"] and m.stop_reason == "tool_use"
    assert m.content[0].thinking.strip() == "Need the weather."
    use = m.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris", "days": 2}
    follow = client.messages.create(model="tiny", max_tokens=30, tools=[TOOL], messages=[
        *kw["messages"],
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": '{"temp": 21}'}]},
    ], extra_body={"test_output": "It is 21 degrees."})
    assert follow.content[0].text == "It is 21 degrees." and follow.stop_reason == "end_turn"


def test_stop_sequences_and_tool_choice_any(client):
    m = client.messages.create(model="tiny", max_tokens=30, messages=user({"type": "text", "text": "hi"}),
                               stop_sequences=["STOP"], extra_body={"test_output": "one two STOP three"})
    assert m.content[0].text == "one two " and m.stop_reason == "stop_sequence" and m.stop_sequence == "STOP"
    forced = client.messages.create(model="tiny", max_tokens=60, tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather"},
                                    messages=user({"type": "text", "text": "hi"}),
                                    extra_body={"test_output": "<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"})
    assert forced.content[-1].type == "tool_use" and forced.content[-1].input == {"city": "Rome"}


def test_anthropic_errors_and_auth(live_server, client):
    with pytest.raises(anthropic.AuthenticationError) as auth:
        anthropic.Anthropic(base_url=live_server.url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=5, messages=user({"type": "text", "text": "hi"}))
    assert auth.value.body["type"] == "error" and auth.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=5, messages=user({"type": "text", "text": "hi"}))
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="tiny", max_tokens=5, messages=user({"type": "document", "source": {}}))
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "document" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="output_config.format"):
        client.messages.create(model="tiny", max_tokens=5, messages=user({"type": "text", "text": "hi"}),
                               output_config={"format": {"type": "json_schema", "schema": {"type": "nonsense"}}})
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    r = client.messages.create(model="tiny", max_tokens=20, messages=user({"type": "text", "text": "hi"}),
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    assert isinstance(json.loads(r.content[0].text)["ok"], bool)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model="tiny", max_tokens=0, messages=user({"type": "text", "text": "hi"}))
