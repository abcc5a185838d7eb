"""/metrics through prometheus_client, under vLLM's metric names where vLLM has one (``vllm:num_requests_running``,
``vllm:time_to_first_token_seconds``, ...: dashboards made for vLLM work unchanged), ``minicpmv:`` names for the rest.

Engine counts and gauges are read from ``Engine.stats()`` at each scrape; the latency histograms are observed by the
protocol routes, which see the requests' timing.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from minicpmv.engine.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192, 32768, 131072)


class EngineCollector:
    """The engine's state at scrape time."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model = engine, model_name

    def collect(self):
        s = self.engine.stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model], value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model], value)
            return c

        yield gauge("vllm:num_requests_running", "Requests being decoded or prefilled.", s.running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be admitted.", s.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Sequence state memory in use, as a fraction of the budget.",
                    s.state_bytes / s.state_budget_bytes if s.state_budget_bytes else 0.0)
        yield counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.", s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Generated tokens.", s.generation_tokens)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prompt_tokens)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.cached_tokens)
        success = CounterMetricFamily("vllm:request_success", "Finished requests by finish reason.",
                                      labels=[*labels, "finished_reason"])
        for reason, n in sorted(s.finished.items()):
            success.add_metric([self.model, reason], n)
        yield success
        yield gauge("minicpmv:state_memory_bytes", "Sequence state (attention KV + DeltaNet) allocated.", s.state_bytes)
        yield gauge("minicpmv:state_memory_peak_bytes", "Highest sequence state allocated so far.", s.state_bytes_peak)
        yield gauge("minicpmv:state_memory_reserved_bytes", "Sequence state reserved by running requests.",
                    s.state_bytes_reserved)
        yield gauge("minicpmv:state_memory_budget_bytes", "The sequence state budget (--max-state-memory).",
                    s.state_budget_bytes)
        yield counter("minicpmv:prefilled_tokens", "Prompt tokens computed (not from the prefix cache).", s.prefilled_tokens)
        yield counter("minicpmv:prefix_cache_hit_requests", "Requests that started from a cached prefix.", s.prefix_cache_hits)
        yield counter("minicpmv:vision_encode_seconds", "Time spent encoding images and video frames.", s.vision_encode_seconds)
        yield counter("minicpmv:vision_cache_hits", "Visual inputs found in the vision cache.", s.vision_cache_hits)
        yield counter("minicpmv:vision_cache_misses", "Visual inputs encoded.", s.vision_cache_misses)


class Metrics:
    """One registry per app. ``ttft`` / ``inter_token`` / ``e2e`` take ``.observe(seconds)``; ``error(status)`` counts
    an error response. (``requests`` / ``prompt_tokens`` / ``completion_tokens`` are plain counts kept for the protocol
    modules; the exposition reads token counts from the engine.)"""

    def __init__(self, engine: Engine | None = None, model_name: str = ""):
        self.lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        m = [model_name]

        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(*m)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.")
        self.inter_token = histogram("vllm:inter_token_latency_seconds", "Time between two output tokens.")
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.")
        self.prompt_length = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.generation_length = histogram("vllm:request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS)
        self._responses = Counter("minicpmv:http_responses", "HTTP responses by status.", ["model_name", "status"],
                                  registry=self.registry)
        self.model_name = model_name
        if engine is not None:
            self.registry.register(EngineCollector(engine, model_name))

    def error(self, status: int) -> None:
        self._responses.labels(self.model_name, str(status)).inc()

    def done(self, status: int, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """A request answered (or streamed to its end)."""
        self._responses.labels(self.model_name, str(status)).inc()
        self.e2e.observe(seconds)
        self.prompt_length.observe(prompt_tokens)
        self.generation_length.observe(completion_tokens)
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def render(self, stats=None) -> bytes:
        """The text exposition (``stats`` is ignored: the engine is read through the collector)."""
        return generate_latest(self.registry)
