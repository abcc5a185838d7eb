"""Prometheus text exposition, written by hand: a few counters, gauges read from the engine, two histograms."""

from __future__ import annotations

import threading
from bisect import bisect_left

from minicpmv.engine.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.total}", f"{name}_count {running}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.errors: dict[int, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.inter_token = Histogram()

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[status] = self.errors.get(status, 0) + 1

    def render(self, stats: EngineStats) -> str:
        p = "minicpmv"
        with self.lock:
            lines = [
                f"# TYPE {p}_requests_total counter",
                f"{p}_requests_total {self.requests}",
                f"# TYPE {p}_request_errors_total counter",
                *(f'{p}_request_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.errors.items())),
                f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# TYPE {p}_completion_tokens_total counter",
                f"{p}_completion_tokens_total {self.completion_tokens}",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
                *self.ttft.lines(f"{p}_time_to_first_token_seconds"),
                f"# TYPE {p}_inter_token_latency_seconds histogram",
                *self.inter_token.lines(f"{p}_inter_token_latency_seconds"),
            ]
        lines += [
            f"# TYPE {p}_queue_depth gauge",
            f"{p}_queue_depth {stats.waiting}",
            f"# TYPE {p}_running_sequences gauge",
            f"{p}_running_sequences {stats.running}",
            f"# TYPE {p}_vision_encode_seconds_total counter",
            f"{p}_vision_encode_seconds_total {stats.vision_encode_seconds}",
            f"# TYPE {p}_vision_cache_hits_total counter",
            f"{p}_vision_cache_hits_total {stats.vision_cache_hits}",
            f"# TYPE {p}_vision_cache_misses_total counter",
            f"{p}_vision_cache_misses_total {stats.vision_cache_misses}",
            f"# TYPE {p}_prefix_cache_hits_total counter",
            f"{p}_prefix_cache_hits_total {stats.prefix_cache_hits}",
            f"# TYPE {p}_prefix_cached_tokens_total counter",
            f"{p}_prefix_cached_tokens_total {stats.cached_tokens}",
        ]
        return "\n".join(lines) + "\n"
