"""A real ``minicpmv serve`` process on the tiny checkpoint: the state memory budget under 32 concurrent long
requests, and graceful shutdown (SIGTERM, a second signal) with a stream and a whole answer in flight."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from tests.tiny import metric, start_server

BUDGET = 2 << 20  # 2 MiB of sequence state: a handful of the long requests at once
MARGIN = 300 << 20  # stated margin for the process's growth beyond the state: allocator slack, logits, HTTP buffers


def body(content: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 1.0, "seed": 0, **kw}


def rss_peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def servers(tiny_dir):
    """Two servers, started together (start-up is most of these tests' time): one with a small state budget and a
    2 s shutdown timeout, one with a 60 s shutdown timeout."""
    args = [("--max-state-memory", str(BUDGET), "--shutdown-timeout", "2"), ("--shutdown-timeout", "60")]
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda a: start_server(tiny_dir, "--served-model-name", "tiny", *a), args))
    yield started
    for proc, _ in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def budget_server(servers):
    return servers[0]


def test_32_long_requests_under_a_small_state_budget(budget_server):
    proc, url = budget_server
    warm = httpx.post(url + "/v1/chat/completions", json=body("warm up", max_tokens=4), timeout=60)
    assert warm.status_code == 200
    baseline = rss_peak(proc.pid)
    long_prompt = "word " * 2000

    def one(i: int):
        never_fits = i % 8 == 7  # 20000 more tokens would need more state than the whole budget
        b = body(f"{i} {long_prompt}", max_tokens=20000 if never_fits else 12, ignore_eos=True, stream=i % 2 == 0)
        r = httpx.post(url + "/v1/chat/completions", json=b, timeout=120)
        return never_fits, r

    peaks = []
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(one, i) for i in range(32)]
        while not all(f.done() for f in futures):  # the engine's own accounting, sampled while the load runs
            m = httpx.get(url + "/metrics", timeout=10).text
            peaks.append((metric(m, "minicpmv:state_memory_bytes"), metric(m, "minicpmv:state_memory_reserved_bytes"),
                          metric(m, "vllm:num_requests_waiting")))
            time.sleep(0.2)
        results = [f.result() for f in futures]
    for never_fits, r in results:
        if never_fits:
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert "--max-state-memory" in error["message"] and error["param"] == "max_tokens"
        else:
            assert r.status_code == 200, r.text
            if r.headers["content-type"].startswith("text/event-stream"):
                events = sse_events(r.text)
                assert events[-1] == "[DONE]" and '"finish_reason": "length"' in events[-2]
            else:
                assert r.json()["choices"][0]["finish_reason"] == "length"
    m = httpx.get(url + "/metrics", timeout=10).text
    assert metric(m, "minicpmv:state_memory_budget_bytes") == BUDGET
    assert 0 < metric(m, "minicpmv:state_memory_peak_bytes") <= BUDGET
    assert all(used <= BUDGET and reserved <= BUDGET for used, reserved, _ in peaks)
    assert max(waiting for _, _, waiting in peaks) > 0  # requests did wait for memory
    assert metric(m, "vllm:num_requests_running") == 0 and metric(m, "minicpmv:state_memory_bytes") == 0
    growth = rss_peak(proc.pid) - baseline
    assert growth <= BUDGET + MARGIN, f"the process grew {growth >> 20} MiB"


def test_sigterm_with_a_stream_and_a_whole_answer_in_flight(budget_server):
    """New requests get 503; after --shutdown-timeout the stream ends with an error event and [DONE], the whole
    answer gets a 503 JSON error; the process exits 0 with no traceback."""
    proc, url = budget_server
    endless = body("Go on.", max_tokens=3000, ignore_eos=True)
    got: dict = {}

    def whole():
        got["whole"] = httpx.post(url + "/v1/chat/completions", json=endless, timeout=60)

    def streamed():
        with httpx.stream("POST", url + "/v1/chat/completions", json={**endless, "stream": True}, timeout=60) as r:
            got["stream"] = r.status_code, "".join(r.iter_text())

    threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while metric(httpx.get(url + "/metrics", timeout=10).text, "vllm:num_requests_running") < 2:
        assert time.time() < deadline
        time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = httpx.post(url + "/v1/chat/completions", json=body("late", max_tokens=2), timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 503
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    for t in threads:
        t.join(10)
    assert proc.returncode == 0, err
    assert 2 <= took < 2 + 6, took  # the shutdown timeout, then the ending and the exit
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert got["whole"].status_code == 503 and "shut down" in got["whole"].json()["error"]["message"]
    status, text = got["stream"]
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 503
    assert "SIGTERM: shutting down" in err


def test_a_second_signal_ends_requests_at_once(servers):
    proc, url = servers[1]
    try:
        got = {}

        def streamed():
            b = {**body("Go on.", max_tokens=5000, ignore_eos=True), "stream": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=b, timeout=60) as r:
                got["text"] = "".join(r.iter_text())

        t = threading.Thread(target=streamed)
        t.start()
        deadline = time.time() + 30
        while metric(httpx.get(url + "/metrics", timeout=10).text, "vllm:num_requests_running") < 1:
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
        t.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert took < 5, took  # not the 60 s shutdown timeout
    assert "Traceback" not in err and "CancelledError" not in err, err
    events = sse_events(got["text"])
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 503
