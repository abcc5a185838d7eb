"""Ollama's API through the official ollama client: chat (streamed, an image, tools, think), generate, list, show,
ps, version; Ollama's error bodies; options mapped onto our sampling."""

from __future__ import annotations

import json

import httpx
import ollama
import jsonschema
import pytest

from tests.tiny import KEY, png_bytes, write_clip

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def client(live_server):
    return ollama.Client(host=live_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_list_show_ps_version(client):
    models = client.list().models
    assert [m.model for m in models] == ["tiny"] and models[0].details.family == "minicpmv"
    shown = client.show("tiny:latest")
    assert "vision" in shown.capabilities and "tools" in shown.capabilities
    assert client.ps().models[0].context_length > 0
    assert client._client.get("/api/version").json()["version"]


def test_chat_streamed_and_not_agree_with_an_image(client):
    messages = [{"role": "user", "content": "What is this?", "images": [png_bytes(40, 30)]}]
    whole = client.chat(model="tiny", messages=messages, options=GREEDY, keep_alive="5m")
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 6
    assert whole.prompt_eval_count > 64  # the image's placeholders
    parts = list(client.chat(model="tiny", messages=messages, options=GREEDY, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    # our processing options ride in options: 4x mode gives the image more tokens
    four = client.chat(model="tiny", messages=messages, options={**GREEDY, "downsample_mode": "4x"})
    assert four.prompt_eval_count > whole.prompt_eval_count


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_tools_and_thinking(client, stream):
    out = "<think>\nCheck the weather.\n</think>\n\n" + CALL  # forced by the server's test hook
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    got = client.chat(model="tiny", messages=messages, tools=[TOOL], think=True, stream=stream,
                      options={"num_predict": 200, "test_output": out})
    lines = list(got) if stream else [got]
    calls = [c for r in lines for c in (r.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": 2})]
    assert "".join(r.message.thinking or "" for r in lines).strip() == "Check the weather."
    assert lines[-1].done and lines[-1].done_reason == "stop"
    # the call and its result go back in: the tool message is part of the next prompt
    follow = client.chat(model="tiny", tools=[TOOL], options=GREEDY, messages=[
        *messages,
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"}])
    assert follow.done and follow.prompt_eval_count > lines[-1].prompt_eval_count


def test_format_schema_and_json_constrain_the_answer(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 8}}, "required": ["colour"],
              "additionalProperties": False}
    r = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], format=schema,
                    options={"num_predict": 40, "temperature": 0})
    jsonschema.validate(json.loads(r.message.content), schema)  # random weights: only the constraint makes it valid
    streamed = "".join(p.message.content for p in client.chat(
        model="tiny", messages=[{"role": "user", "content": "hi"}], format=schema, stream=True,
        options={"num_predict": 40, "temperature": 0}))
    assert streamed == r.message.content
    r = client.generate(model="tiny", prompt="hi", format="json", options={"num_predict": 40, "temperature": 0})
    assert isinstance(json.loads(r.response), dict)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], format={"type": "nonsense"})
    assert err.value.status_code == 400 and "format" in err.value.error


def test_generate_and_stop_option(client):
    r = client.generate(model="tiny", prompt="Once upon a time", options=GREEDY)
    assert r.done and r.eval_count == 6 and isinstance(r.response, str)
    parts = list(client.generate(model="tiny", prompt="Once upon a time", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == r.response
    raw = client.generate(model="tiny", prompt="Once upon a time", raw=True, options=GREEDY)
    assert raw.prompt_eval_count < r.prompt_eval_count  # no chat template around it
    seeded = [client.generate(model="tiny", prompt="x", options={"seed": 3, "temperature": 1.0, "top_k": 50, "num_predict": 5}).response
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_ollama_error_bodies(live_server, client):
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    with pytest.raises(ollama.ResponseError, match="mirostat"):
        client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options={"mirostat": 2})
    with pytest.raises(ollama.ResponseError, match="num_ctx"):
        client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_ctx": 3})
    r = httpx.post(live_server.url + "/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "hi", "images": ["%%%"]}]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()) == {"error"} and "base64" in r.json()["error"]
    assert httpx.get(live_server.url + "/api/tags").status_code == 401


def test_videos_extra_on_a_raw_request(live_server, tmp_path):
    """The ollama client drops unknown message fields, so this extra is shown with a plain POST."""
    import base64

    path = tmp_path / "clip.mp4"
    write_clip(path, "mpeg4", 64, 48, 4, 8)
    video = base64.b64encode(path.read_bytes()).decode()
    body = {"model": "tiny", "stream": False, "options": {**GREEDY, "max_num_frames": 2, "max_slice_nums": 1},
            "messages": [{"role": "user", "content": "What happens?", "videos": [video]}]}
    r = httpx.post(live_server.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    plain = httpx.post(live_server.url + "/api/chat", json={**body, "messages": [{"role": "user", "content": "What happens?"}]},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.json()["prompt_eval_count"] > plain.json()["prompt_eval_count"] + 32  # the frames' placeholders
