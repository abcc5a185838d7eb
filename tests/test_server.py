"""A real server on 127.0.0.1 driven by the official openai client: chat, streaming, media, tools, thinking,
concurrency, cancellation and every error status."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image

from minicpmv.engine.engine import EngineConfig
from minicpmv.llm import LLM
from minicpmv.serve.app import ServerConfig
from minicpmv.serve.media import MediaPolicy
from tests.tiny import KEY, WEATHER_TOOL, Server, call_xml, eventually, write_clip

TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(tiny_dir, media_dir):
    llm = LLM(tiny_dir, dtype="float32", progress=False, engine_config=EngineConfig(max_num_seqs=8, max_waiting=64))
    config = ServerConfig(
        model_name="tiny",
        api_key=KEY,
        max_body_bytes=4 << 20,
        media=MediaPolicy(allowed_local_path=media_dir),
        enable_test_hooks=True,
    )
    s = Server(llm, config)
    yield s
    s.stop()


def data_uri(w, h, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(*uris, text="What is this?"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def chat(server, messages, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return server.client.chat.completions.create(model="tiny", messages=messages, **kw)


def stream(server, messages, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return chunks, text, reasoning, finish


# -- the happy paths -----------------------------------------------------------------------------------------
def test_models_health_and_metrics(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    chat(server, [{"role": "user", "content": "Hi"}])
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_sum",
                 "vllm:prefix_cache_hits_total", "vllm:kv_cache_usage_perc", "minicpmv:state_memory_bytes",
                 "minicpmv:state_memory_budget_bytes", "minicpmv:vision_encode_seconds_total",
                 "minicpmv:vision_cache_hits_total"):
        assert f'{name}{{' in metrics, name
    generated = float(metrics.split('vllm:generation_tokens_total{model_name="tiny"} ')[1].split()[0])
    assert generated >= 6


def test_chat_non_stream_and_stream_agree(server):
    messages = [{"role": "user", "content": "Tell me something."}]
    full = chat(server, messages, max_tokens=8, seed=1, temperature=0.9)
    chunks, text, _, finish = stream(server, messages, max_tokens=8, seed=1, temperature=0.9, stream_options={"include_usage": True})
    assert full.choices[0].message.content == (text or None)
    assert finish == [full.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def image_tokens(server, messages, **extra) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": 2, **extra}
    r = server.post(body)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_images_as_data_uris_and_per_request_mode(server):
    one16 = image_tokens(server, image_message(data_uri(448, 448)))
    one4 = image_tokens(server, image_message(data_uri(448, 448)), mm_processor_kwargs={"downsample_mode": "4x"})
    two = image_tokens(server, image_message(data_uri(448, 448), data_uri(640, 480, 1)))
    assert one16["prompt_tokens_details"]["image_tokens"] == 64
    assert one4["prompt_tokens_details"]["image_tokens"] == 256
    assert two["prompt_tokens_details"]["image_tokens"] > 64
    assert two["prompt_tokens"] > one16["prompt_tokens"]
    # and through the official client
    assert chat(server, image_message(data_uri(448, 448))).usage.prompt_tokens == one16["prompt_tokens"]


def test_video_as_data_uri_next_to_an_image(server, tmp_path):
    write_clip(tmp_path / "clip.mp4", "libx264", 160, 120, 4, 10)
    video = "data:video/mp4;base64," + base64.b64encode((tmp_path / "clip.mp4").read_bytes()).decode()
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video}},
        {"type": "image_url", "image_url": {"url": data_uri(300, 200)}},
        {"type": "text", "text": "What happens?"}]}]
    usage = image_tokens(server, messages, mm_processor_kwargs={"max_slice_nums": 1})
    assert usage["prompt_tokens_details"]["video_tokens"] > 0 and usage["prompt_tokens_details"]["image_tokens"] > 0
    _, text, _, finish = stream(server, messages, extra_body={"mm_processor_kwargs": {"max_num_frames": 2}})
    assert finish == ["length"]


def test_local_file_media_only_under_the_allowed_path(server, media_dir, tmp_path):
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(media_dir / "black.png")
    ok = image_tokens(server, image_message(f"file://{media_dir / 'black.png'}"))
    assert ok["prompt_tokens_details"]["image_tokens"] > 0
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "outside.png")
    r = server.post({"model": "tiny", "messages": image_message(f"file://{tmp_path / 'outside.png'}")})
    assert r.status_code == 400 and "outside.png" in r.json()["error"]["message"]


@pytest.mark.parametrize("spelling", ["image", "path", "url"])
def test_every_media_spelling_goes_through_the_media_policy(server, media_dir, tmp_path, spelling):
    """The processor also reads {"type": "image", "image": ...}, {"path": ...} and {"url": ...} parts: the server
    must fetch those under the same policy, never hand a client's path to the processor."""
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(media_dir / "grey.png")
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "secret.png")
    inside = [{"role": "user", "content": [{"type": "image", spelling: str(media_dir / "grey.png")}]}]
    assert image_tokens(server, inside)["prompt_tokens_details"]["image_tokens"] > 0
    outside = [{"role": "user", "content": [{"type": "image", spelling: str(tmp_path / "secret.png")}]}]
    assert "secret.png" in error_of(server.post({"model": "tiny", "messages": outside}), 400)


def test_thinking_on_and_off(server):
    forced = "Let me look.\n</think>\n\nIt is a cat."
    on = chat(server, [{"role": "user", "content": "?"}], max_tokens=50, extra_body={"test_output": forced, "chat_template_kwargs": {"enable_thinking": True}})
    assert on.choices[0].message.model_extra["reasoning_content"] == "Let me look."
    assert on.choices[0].message.content == "It is a cat."
    _, text, reasoning, _ = stream(server, [{"role": "user", "content": "?"}], max_tokens=50,
                                   extra_body={"test_output": forced, "chat_template_kwargs": {"enable_thinking": True}})
    assert (reasoning, text) == ("Let me look.", "It is a cat.")
    off = chat(server, [{"role": "user", "content": "?"}], max_tokens=50, extra_body={"test_output": "It is a dog."})
    assert off.choices[0].message.content == "It is a dog."
    assert off.choices[0].message.model_extra.get("reasoning_content") is None
    cut = chat(server, [{"role": "user", "content": "?"}], max_tokens=3,
               extra_body={"test_output": "thinking and thinking and thinking", "chat_template_kwargs": {"enable_thinking": True}})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content is None
    assert cut.choices[0].message.model_extra["reasoning_content"]


def test_escaped_newline_normalisation_is_opt_in(server):
    raw = "line one\\nline two"
    kw = dict(max_tokens=50, extra_body={"test_output": raw})
    assert chat(server, [{"role": "user", "content": "?"}], **kw).choices[0].message.content == raw
    kw["extra_body"]["normalize_escaped_newlines"] = True
    assert chat(server, [{"role": "user", "content": "?"}], **kw).choices[0].message.content == "line one\nline two"


def test_logprobs_stream_and_non_stream(server):
    messages = [{"role": "user", "content": "Hi"}]
    full = chat(server, messages, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0)
    entries = full.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob <= 0 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)
    assert entries[0].logprob == pytest.approx(entries[0].top_logprobs[0].logprob)  # greedy picks the top token
    chunks, _, _, _ = stream(server, messages, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]


# -- tool calls ----------------------------------------------------------------------------------------------
TOOL_CASES = {
    "one call": (call_xml("get_weather", city="Paris"), None, [("get_weather", {"city": "Paris"})]),
    "two calls": (call_xml("get_weather", city="Rome") + "\n" + call_xml("get_time", zone="CET"), None,
                  [("get_weather", {"city": "Rome"}), ("get_time", {"zone": "CET"})]),
    "text then call": ("Checking.\n\n" + call_xml("get_time", zone="UTC"), "Checking.", [("get_time", {"zone": "UTC"})]),
    "every type": (
        call_xml("get_weather", city="New\nYork", days=3, scale=1.5, metric="true", tags='["a", 1]',
                 where='{"lat": 1.0, "nested": {"x": [1, 2]}}', note="null"),
        None,
        [("get_weather", {"city": "New\nYork", "days": 3, "scale": 1.5, "metric": True, "tags": ["a", 1],
                          "where": {"lat": 1.0, "nested": {"x": [1, 2]}}, "note": None})],
    ),
}


@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_tool_calls_stream_and_non_stream(server, case):
    output, content, calls = TOOL_CASES[case]
    kw = dict(tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=200, extra_body={"test_output": output})
    message = chat(server, [{"role": "user", "content": "?"}], **kw).choices[0]
    assert message.finish_reason == "tool_calls"
    assert message.message.content == content
    got = [(c.function.name, json.loads(c.function.arguments)) for c in message.message.tool_calls]
    assert got == calls
    chunks, text, _, finish = stream(server, [{"role": "user", "content": "?"}], **kw)
    assert finish == ["tool_calls"] and (text or None) == content
    streamed: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = streamed.setdefault(tc.index, {"name": None, "args": ""})
            if tc.function.name:
                assert entry["name"] is None and entry["args"] == ""  # the name comes first, once
                entry["name"] = tc.function.name
            entry["args"] += tc.function.arguments or ""
    assert [(e["name"], json.loads(e["args"])) for _, e in sorted(streamed.items())] == calls


@pytest.mark.parametrize("streamed", [False, True])
def test_parallel_tool_calls_false_ends_after_the_first_call(server, streamed):
    output, _, calls = TOOL_CASES["two calls"]
    kw = dict(tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=200, extra_body={"test_output": output + "\nMore text."})
    full = chat(server, [{"role": "user", "content": "?"}], **kw)
    assert len(full.choices[0].message.tool_calls) == 2
    kw["parallel_tool_calls"] = False
    if streamed:
        chunks, text, _, finish = stream(server, [{"role": "user", "content": "?"}], stream_options={"include_usage": True}, **kw)
        names = [tc.function.name for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or []) if tc.function.name]
        usage = chunks[-1].usage
    else:
        r = chat(server, [{"role": "user", "content": "?"}], **kw)
        names, text, finish, usage = [c.function.name for c in r.choices[0].message.tool_calls], r.choices[0].message.content, [r.choices[0].finish_reason], r.usage
    assert names == [calls[0][0]] and not text and finish == ["tool_calls"]
    assert usage.completion_tokens < full.usage.completion_tokens  # generation stopped, nothing was cut afterwards


def test_cut_off_call_is_recovered_and_unknown_names_stay_text(server):
    cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis"
    kw = dict(tools=[WEATHER_TOOL], max_tokens=200, extra_body={"test_output": cut})
    full = chat(server, [{"role": "user", "content": "?"}], **kw).choices[0]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in full.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    chunks, _, _, _ = stream(server, [{"role": "user", "content": "?"}], **kw)
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0].function.name == "get_weather"  # the name goes out before the arguments
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}
    unknown = "<tool_call>\n<function=nope>\n</function>\n</tool_call>"
    kw["extra_body"] = {"test_output": unknown}
    full = chat(server, [{"role": "user", "content": "?"}], **kw).choices[0]
    assert not full.message.tool_calls and full.message.content == unknown and full.finish_reason == "stop"
    chunks, text, _, _ = stream(server, [{"role": "user", "content": "?"}], **kw)
    assert text == unknown and not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)


def test_tool_choice_none_leaves_calls_as_text(server):
    r = chat(server, [{"role": "user", "content": "?"}], tools=[WEATHER_TOOL], tool_choice="none", max_tokens=200,
             extra_body={"test_output": call_xml("get_weather", city="Oslo")})
    assert not r.choices[0].message.tool_calls and "<function=get_weather>" in r.choices[0].message.content


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_choice_required_and_named_force_a_call(server, streamed):
    cases = [
        ("required", "get_time>\n<parameter=zone>\nUTC\n</parameter>\n</function>\n</tool_call>", ("get_time", {"zone": "UTC"})),
        ({"type": "function", "function": {"name": "get_weather"}},
         "<parameter=city>\nLima\n</parameter>\n</function>\n</tool_call>", ("get_weather", {"city": "Lima"})),
    ]
    for choice, output, expected in cases:
        kw = dict(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice, max_tokens=100, extra_body={"test_output": output})
        if streamed:
            chunks, _, _, finish = stream(server, [{"role": "user", "content": "?"}], **kw)
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            name = next(tc.function.name for tc in calls if tc.function.name)
            args = "".join(tc.function.arguments or "" for tc in calls)
            assert finish == ["tool_calls"] and (name, json.loads(args)) == expected
        else:
            r = chat(server, [{"role": "user", "content": "?"}], **kw).choices[0]
            call = r.message.tool_calls[0]
            assert r.finish_reason == "tool_calls" and (call.function.name, json.loads(call.function.arguments)) == expected


def test_tool_choice_errors(server):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "?"}], "max_tokens": 2}
    named = {"type": "function", "function": {"name": "nope"}}
    assert "nope" in error_of(server.post({**base, "tools": [WEATHER_TOOL], "tool_choice": named}), 400)
    assert "tools" in error_of(server.post({**base, "tool_choice": "required"}), 400)


def test_malformed_tools_with_a_forced_call_are_400(server):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "?"}], "max_tokens": 2, "tool_choice": "required"}
    assert "tools" in error_of(server.post({**base, "tools": [{"type": "function", "function": "get_weather"}]}), 400)
    named = {**base, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": "get_weather"}}
    assert "tool_choice" in error_of(server.post(named), 400)


# -- load and cancellation -----------------------------------------------------------------------------------
def test_32_concurrent_streams(server):
    def one(i):
        _, text, _, finish = stream(server, [{"role": "user", "content": f"Story {i}"}], max_tokens=5, seed=i, temperature=1.0)
        return finish

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [["length"]] * 32
    assert len(server.llm.engine.scheduler) == 0


def test_disconnecting_client_frees_its_sequence(server):
    engine = server.llm.engine
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}], "stream": True,
            "max_tokens": 20000, "ignore_eos": True, "temperature": 1.0, "seed": 5}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert len(engine.scheduler.running) == 1
        seq = engine.scheduler.running[0]
    deadline = time.time() + 10
    while seq.finish_reason is None and time.time() < deadline:
        time.sleep(0.05)
    assert seq.finish_reason == "abort" and seq.state is None
    assert chat(server, [{"role": "user", "content": "still there?"}]).choices[0].finish_reason == "length"


# -- errors --------------------------------------------------------------------------------------------------
def error_of(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == status
    assert "Traceback" not in r.text
    return body["error"]["message"]


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 9}, "less than or equal to 8"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"frobnicate": True}, "frobnicate"),
        ({"messages": []}, "messages"),
        ({"messages": image_message("data:image/png;base64,AAAA")}, "image"),
        ({"messages": image_message("data:image/png;base64,!!!")}, "base64"),
        ({"messages": [{"role": "user", "content": "word " * 40000}]}, "context"),  # tiny model: 32k context
        ({"mm_processor_kwargs": {"downsample_mode": "2x"}}, "downsample_mode"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"test_output": 5}, "test_output"),
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "not valid Unicode"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]}, "string 'text'"),
        ({"tools": [{}]}, "tools[0]"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "two tools"),
        ({"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]}, "not valid JSON"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": "4"}, "max_tokens"),  # strict types
        ({"max_tokens": 4.5}, "max_tokens"),
        ({"tools": [WEATHER_TOOL, {"type": "custom", "custom": {"name": "grammar"}}]}, "only function tools"),
        ({"temperature": 1e39}, "temperature"),  # infinite in float32
    ],
)
def test_bad_requests_are_400_and_the_server_keeps_serving(server, patch, needle):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **patch}
    assert needle in error_of(server.post(body), 400)
    assert chat(server, [{"role": "user", "content": "Hi"}]).choices[0].finish_reason == "length"


def test_lenient_spellings_that_clients_send_are_accepted(server):
    tool = {"type": None, "function": {"name": "now", "parameters": None}}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2.0, "seed": 1.0,
            "stop_token_ids": [7.0], "tools": [tool]}
    r = server.post(body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_a_bad_sampling_value_names_its_field_in_param(server):
    r = server.post({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_p": 0})
    assert "top_p" in error_of(r, 400) and r.json()["error"]["param"] == "top_p"


def test_auth_unknown_model_and_oversized_body(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert "API key" in error_of(server.post(body, key=None), 401)
    assert "API key" in error_of(server.post(body, key="wrong"), 401)
    lowercase = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"bearer {KEY}"}, timeout=60)
    assert lowercase.status_code == 200  # the scheme name is case-insensitive
    raw = dict(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert "not valid JSON" in error_of(server.post({}, content=b"{oops"), 400)
    as_text = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body), **raw)  # no Content-Type
    assert "Content-Type: application/json" in error_of(as_text, 400)
    assert "gpt-4" in error_of(server.post({**body, "model": "gpt-4"}), 404)
    huge = {**body, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    assert "exceeds" in error_of(server.post(huge), 413)
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_chunked_body_over_the_limit_is_413_too(server):
    """No Content-Length to check up front: the limit is enforced while the body streams in."""
    def chunks():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(6):
            yield b"x" * (1 << 20)
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert "exceeds" in error_of(r, 413)
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("streamed", [True, False])
@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_a_failure_inside_the_model_is_a_500_and_the_server_keeps_serving(server, monkeypatch, error, streamed):
    """Only bad input is a 400: a bug inside the model (even a ValueError) is an internal error, streamed or not."""
    runner = server.llm.engine.runner
    real, calls = runner.run, []

    def failing_third_forward(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise error("simulated failure")
        return real(*args, **kw)

    monkeypatch.setattr(runner, "run", failing_third_forward)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True,
            "stream": streamed}
    r = server.post(body)
    assert "Traceback" not in r.text and "simulated" not in r.text
    if streamed:
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        body_error = json.loads(events[-2])["error"]
    else:
        assert r.status_code == 500
        body_error = r.json()["error"]
    assert body_error["code"] == 500 and body_error["type"] == "internal_error"
    assert error.__name__ in body_error["message"]
    monkeypatch.undo()
    assert chat(server, [{"role": "user", "content": "Hi"}]).choices[0].finish_reason == "length"


def test_queue_full_is_429(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32", progress=False, engine_config=EngineConfig(max_num_seqs=1, max_waiting=1))
    small = Server(llm, ServerConfig(model_name="tiny", api_key=KEY))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100, "ignore_eos": True}
        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(lambda _: small.post(body).status_code, range(6)))
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        r = small.post({**body, "max_tokens": 2})
        assert r.status_code == 200
    finally:
        small.stop()


def test_python_chat_from_two_threads_while_the_server_streams(server):
    """One LLM shared by the server and two threads calling llm.chat: every answer is whole and is its own."""
    from minicpmv.engine.sampling import SamplingParams

    prompts = [f"Question number {i}?" for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = {p: server.llm.chat([{"role": "user", "content": p}], params)[0].token_ids for p in prompts}

    def python_chats(offset: int) -> list:
        return [(p, server.llm.chat([{"role": "user", "content": p}], params)[0].token_ids) for p in prompts[offset::2]]

    def streamed(p: str) -> list[int]:
        chunks = server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": p}], stream=True, max_tokens=8, temperature=0,
            logprobs=True, extra_body={"ignore_eos": True})
        return [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]

    with ThreadPoolExecutor(8) as pool:
        threads = [pool.submit(python_chats, k) for k in (0, 1)]
        streams = {p: pool.submit(streamed, p) for p in prompts}
        results = dict(r for t in threads for r in t.result())
        texts = {p: f.result() for p, f in streams.items()}
    assert results == alone
    tok = server.llm.processor.tokenizer
    for p, pieces in texts.items():
        assert pieces == [tok.decode([t]) for t in alone[p]]


# -- structured output ---------------------------------------------------------------------------------------
RECEIPT_TOOL = {"type": "function", "function": {"name": "file_receipt", "parameters": {
    "type": "object", "required": ["shop", "total"], "properties": {
        "shop": {"type": "string", "maxLength": 8},
        "total": {"type": "number", "minimum": 0, "maximum": 500, "multipleOf": 0.5},
        "paid": {"type": "boolean"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
        "lines": {"type": "array", "maxItems": 2, "items": {"type": "object", "additionalProperties": False,
                  "required": ["qty"], "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}}}}}}}}
LOOKUP_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "required": ["code"], "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}}}}


def tool_schema(name):
    return next(t["function"]["parameters"] for t in (RECEIPT_TOOL, LOOKUP_TOOL) if t["function"]["name"] == name)


def test_openai_parse_with_a_pydantic_model_returns_the_parsed_object(server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Line(BaseModel):
        sku: str = Field(pattern=r"^[0-9]{4}$")
        qty: int = Field(ge=1, le=9)

    class Receipt(BaseModel):
        shop: Literal["aldi", "lidl", "spar"]
        total: int = Field(ge=0, le=999)
        paid: bool
        lines: list[Line] = Field(max_length=2)

    for seed in range(3):
        r = server.client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Read it."}],
                                                 response_format=Receipt, max_tokens=120, temperature=1.0, seed=seed)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Receipt) and r.choices[0].finish_reason == "stop"
        assert parsed == Receipt.model_validate_json(r.choices[0].message.content)


@pytest.mark.parametrize("extra, check", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}}}}, lambda t: set(json.loads(t)) == {"n"} and 0 <= json.loads(t)["n"] <= 9),
    ({"structured_outputs": {"regex": "[a-c]{2}-[0-9]{2}"}}, lambda t: re.fullmatch("[a-c]{2}-[0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["cat", "dog"]}}, lambda t: t in ("cat", "dog")),
    ({"structured_outputs": {"grammar": 'start: "x=" /[0-9]{1,3}/'}}, lambda t: re.fullmatch("x=[0-9]{1,3}", t)),
    ({"structured_outputs": {"json": {"enum": ["on", "off"]}}}, lambda t: json.loads(t) in ("on", "off")),
    ({"guided_json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
     lambda t: isinstance(json.loads(t), list) and len(json.loads(t)) <= 2),
    ({"guided_regex": "[0-9]{3}"}, lambda t: re.fullmatch("[0-9]{3}", t)),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"guided_grammar": 'start: "a" | "b"'}, lambda t: t in ("a", "b")),
])
def test_every_structured_spelling_constrains_stream_and_non_stream_alike(server, extra, check):
    messages = [{"role": "user", "content": "Answer."}]
    kw = dict(max_tokens=60, temperature=1.0, seed=5, extra_body=extra)
    r = chat(server, messages, **kw).choices[0]
    assert r.finish_reason == "stop" and check(r.message.content), r.message.content
    _, text, _, finish = stream(server, messages, **kw)
    assert text == r.message.content and finish == ["stop"]


def test_json_object_and_text_response_formats(server):
    messages = [{"role": "user", "content": "JSON."}]
    free = chat(server, messages, response_format={"type": "text"}, max_tokens=4)
    assert free.choices[0].finish_reason == "length"
    for seed in range(4):
        r = chat(server, messages, response_format={"type": "json_object"}, max_tokens=30, temperature=1.0, seed=seed)
        text = r.choices[0].message.content
        assert text.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens mid-JSON
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 30


@pytest.mark.parametrize("patch, needle, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "strng", "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema", "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "unclosed", "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one", "structured_outputs"),
    ({"structured_outputs": {"whatever": 1}}, "whatever", "structured_outputs"),
    ({"guided_grammar": "start: nothing_here"}, "nothing_here", "guided_grammar"),
    ({"guided_choice": []}, "choice", "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "not several", "guided_regex"),
    ({"tools": [LOOKUP_TOOL], "tool_choice": "required", "guided_regex": "a"}, "cannot be combined", "guided_regex"),
])
def test_a_bad_constraint_is_400_with_the_reason(server, patch, needle, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **patch}
    r = server.post(body)
    assert needle in error_of(r, 400) and r.json()["error"]["param"] == param
    assert chat(server, [{"role": "user", "content": "Hi"}]).choices[0].finish_reason == "length"


@pytest.mark.parametrize("streamed", [False, True])
def test_forced_tool_calls_always_parse_and_validate_with_random_weights(server, streamed):
    import jsonschema

    tools = [RECEIPT_TOOL, LOOKUP_TOOL]
    choices = ["required", {"type": "function", "function": {"name": "file_receipt"}},
               {"type": "function", "function": {"name": "lookup"}}]
    for seed in range(4):
        for choice in choices:
            kw = dict(tools=tools, tool_choice=choice, max_tokens=200, temperature=1.0, seed=seed,
                      parallel_tool_calls=False)
            if streamed:
                chunks, text, _, finish = stream(server, [{"role": "user", "content": "File it."}], **kw)
                deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
                calls = [(next(tc.function.name for tc in deltas if tc.function.name),
                          json.loads("".join(tc.function.arguments or "" for tc in deltas)))]
            else:
                r = chat(server, [{"role": "user", "content": "File it."}], **kw).choices[0]
                finish, text = [r.finish_reason], r.message.content
                calls = [(c.function.name, json.loads(c.function.arguments)) for c in r.message.tool_calls or []]
            assert finish == ["tool_calls"] and not text and len(calls) == 1, (choice, seed, text)
            name, arguments = calls[0]
            if isinstance(choice, dict):
                assert name == choice["function"]["name"]
            jsonschema.validate(arguments, tool_schema(name))


# -- hardening: hang-ups, OpenAI fields, params, defaults, load -----------------------------------------------
def test_a_whole_answer_client_that_hangs_up_frees_its_sequence_within_a_second(server):
    import socket

    engine = server.llm.engine
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}],
                       "max_tokens": 20000, "ignore_eos": True, "temperature": 1.0, "seed": 5}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    assert eventually(lambda: len(engine.scheduler.running) == 1, 30)
    seq = engine.scheduler.running[0]
    time.sleep(0.3)
    sock.close()
    hung_up = time.monotonic()
    assert eventually(lambda: seq.finish_reason is not None, 5)
    assert time.monotonic() - hung_up < 1.0
    assert seq.finish_reason == "abort" and seq.state is None and len(seq.output_ids) < 20000


def test_openai_fields_accepted_with_no_effect(server):
    messages = [{"role": "user", "content": "Hi"}]
    plain = chat(server, messages, seed=3, temperature=1.0)
    extra = chat(server, messages, seed=3, temperature=1.0, store=False, metadata={"team": "a"}, service_tier="auto",
                 user="u-1", modalities=["text"], prediction={"type": "content", "content": "Hello"})
    assert extra.choices[0].message.content == plain.choices[0].message.content
    r = server.post({"model": "tiny", "messages": messages, "max_tokens": 2, "modalities": ["audio"]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("modalities")
    r = server.post({"model": "tiny", "messages": messages, "max_tokens": 2, "frobnicate": 1, "store": True})
    assert r.status_code == 400 and "frobnicate" in r.json()["error"]["message"]


def test_max_completion_tokens_and_reasoning_effort(server):
    messages = [{"role": "user", "content": "Hi"}]
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=3,
                                              extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    tok = server.llm.processor.tokenizer
    for effort, thinking in (("none", False), ("minimal", False), ("low", True), ("high", True)):
        r = chat(server, messages, reasoning_effort=effort, extra_body={"test_output": "mull</think>answer"})
        assert (getattr(r.choices[0].message, "reasoning_content", None) == "mull") is thinking, effort
        assert r.choices[0].message.content == ("answer" if thinking else "mull</think>answer")
    r = server.post({"model": "tiny", "messages": messages, "reasoning_effort": "high",
                     "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"
    assert tok  # (the tokenizer round-trips the forced output above)


def test_logit_bias_bans_and_forces_tokens(server):
    messages = [{"role": "user", "content": "Say something."}]
    free = chat(server, messages, max_tokens=8, logprobs=True, extra_body={"ignore_eos": True})
    tok = server.llm.processor.tokenizer
    greedy = [tok.encode(t.token)[0] for t in free.choices[0].logprobs.content]
    banned = {str(t): -100 for t in set(greedy)}
    out = chat(server, messages, max_tokens=8, logit_bias=banned, logprobs=True, extra_body={"ignore_eos": True})
    assert not {tok.encode(t.token)[0] for t in out.choices[0].logprobs.content} & set(greedy)
    forced = tok.encode(" yes")[0]
    out = chat(server, messages, max_tokens=5, temperature=1.0, seed=2, logit_bias={str(forced): 100},
               extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == " yes" * 5
    for bias, param in (({"x": 1}, "logit_bias"), ({"5": 101}, "logit_bias"), ({"999999": 1}, "logit_bias")):
        r = server.post({"model": "tiny", "messages": messages, "max_tokens": 2, "logit_bias": bias})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("streamed", [False, True])
def test_legacy_functions_map_onto_tools(server, streamed):
    fn = WEATHER_TOOL["function"]
    output = '<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>'
    kw = dict(functions=[fn], function_call={"name": "get_weather"}, extra_body={"test_output": output[len("<tool_call>\n<function=get_weather>\n"):]})
    if not streamed:
        r = chat(server, [{"role": "user", "content": "Weather?"}], max_tokens=60, **kw)
        call = r.choices[0].message.function_call
        assert r.choices[0].finish_reason == "function_call" and not r.choices[0].message.tool_calls
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    else:
        chunks, _, _, finish = stream(server, [{"role": "user", "content": "Weather?"}], max_tokens=60, **kw)
        calls = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
        assert calls[0].name == "get_weather" and finish == ["function_call"]
        assert json.loads("".join(c.arguments or "" for c in calls)) == {"city": "Paris"}
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
               {"role": "function", "name": "get_weather", "content": "sunny"}]
    assert chat(server, history, functions=[fn]).choices[0].finish_reason in ("length", "stop", "function_call")
    r = server.post({"model": "tiny", "messages": history, "functions": [fn], "tools": [WEATHER_TOOL]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "functions"


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "wizard", "content": "Hi"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "audio", "x": 1}]}],
         "messages[1].content[0].type"),
    ],
)
def test_a_400_caused_by_one_message_field_names_it(server, messages, param):
    r = server.post({"model": "tiny", "messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_max_tokens_beyond_the_context_names_max_tokens(server):
    r = server.post({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "context" in r.text


def test_models_metadata_and_default_max_tokens(tiny_dir, server):
    card = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
    assert card["demo_random_weights"] is False and card["max_model_len"] == server.llm.engine.max_model_len
    llm = LLM(tiny_dir, dtype="float32", progress=False)
    small = Server(llm, ServerConfig(model_name="tiny", default_max_tokens=7))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
        assert small.post(body, key=None).json()["usage"]["completion_tokens"] == 7
        assert small.post({**body, "max_tokens": 3}, key=None).json()["usage"]["completion_tokens"] == 3
    finally:
        small.stop()
        llm.close()


def test_an_access_line_per_request(server, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="minicpmv.access"):
        r = chat(server, [{"role": "user", "content": "Hi"}], max_tokens=3, extra_body={"ignore_eos": True})
        server.post({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_p": 0})
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "minicpmv.access"]
    assert any(line.startswith(r.id + " 200 prompt=") and "completion=3" in line and "finish=length" in line
               and "ttft=" in line and "total=" in line for line in lines), lines
    assert any(" 400 " in line and "top_p" in line for line in lines), lines


def test_load_32_clients_with_hang_ups_and_bad_requests(server):
    """32 clients for 10 s: streams, whole answers, clients that hang up mid-answer and bad requests. No 5xx, every
    answer whole, nothing left running afterwards."""
    import random

    engine = server.llm.engine
    stop_at = time.monotonic() + 10
    headers = {"Authorization": f"Bearer {KEY}"}

    def client(i: int) -> dict:
        rng, counts = random.Random(i), {"ok": 0, "hung_up": 0, "bad": 0, "busy": 0}
        with httpx.Client(base_url=server.url, headers=headers, timeout=180) as http:
            while time.monotonic() < stop_at:
                kind = rng.choice(["stream", "whole", "hang_up", "bad"])
                body = {"model": "tiny", "messages": [{"role": "user", "content": f"client {i}"}],
                        "max_tokens": rng.randint(1, 6), "temperature": 1.0, "ignore_eos": True}
                if kind == "bad":
                    r = http.post("/v1/chat/completions", json={**body, "top_p": 7})
                    assert r.status_code == 400, r.text
                    counts["bad"] += 1
                elif kind == "hang_up":
                    with http.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 500, "stream": True}) as r:
                        assert r.status_code in (200, 429), r.status_code
                        next(r.iter_lines())
                    counts["hung_up"] += 1
                else:
                    r = http.post("/v1/chat/completions", json={**body, "stream": kind == "stream"})
                    assert r.status_code in (200, 429), r.text
                    if r.status_code == 429:
                        counts["busy"] += 1
                        continue
                    if kind == "stream":
                        events = [x.removeprefix("data: ") for x in r.text.splitlines() if x.startswith("data: ")]
                        assert events[-1] == "[DONE]" and '"finish_reason": "length"' in events[-2], r.text[-300:]
                    else:
                        assert r.json()["usage"]["completion_tokens"] == body["max_tokens"]
                    counts["ok"] += 1
        return counts

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, range(32)))
    total = {k: sum(r[k] for r in results) for k in results[0]}
    assert total["ok"] >= 10 and total["hung_up"] > 0 and total["bad"] > 0, total  # (a shared 2-core CI box)
    assert eventually(lambda: len(engine.scheduler) == 0, 5), "requests left in the engine"
    assert eventually(lambda: server.app.state.drain.inflight == 0, 5)
    stats = engine.stats()
    assert stats.running == stats.waiting == 0 and stats.state_bytes == 0
