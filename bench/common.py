"""Shared by the benchmarks: the full-size random-weight checkpoint, timing and memory helpers."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("MINICPMV_BENCH_DIR", Path.home() / ".cache" / "minicpmv" / "bench"))


def full_checkpoint() -> Path:
    """The real 1.3B architecture with random bf16 weights and the real tokenizer; written once (2.6 GB)."""
    from minicpmv.demo import write_demo_checkpoint

    path = CACHE / "full-random"
    if not (path / "model.safetensors").exists():
        print(f"writing a full-size random checkpoint to {path} (once)")
        write_demo_checkpoint(path, size="full")
    return path


def image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
