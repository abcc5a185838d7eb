"""Shared by the benchmarks: the full-size random-weight checkpoint, timing and memory helpers."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("MINICPMV_BENCH_DIR", Path.home() / ".cache" / "minicpmv" / "bench"))


def demo_checkpoint(size: str = "full") -> Path:
    """A random-weight checkpoint with the real tokenizer, written once: ``full`` is the real 1.3B architecture
    (2.6 GB), ``tiny`` the test-sized one."""
    from minicpmv.demo import write_demo_checkpoint

    path = CACHE / f"{size}-random"
    if not (path / "model.safetensors").exists():
        print(f"writing a {size} random checkpoint to {path} (once)")
        write_demo_checkpoint(path, size=size)
    return path


def image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def user(text: str, *images) -> list[dict]:
    """One user message: the images, then the text."""
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}]


def proc_status(key: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:")) * 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def decode_rate(model, tokens: int) -> float:
    """Greedy tok/s of a loaded MiniCPMV, one stream, the prefill (a 1-token run) left out."""
    import torch

    prompt = torch.arange(100, 132)
    start = time.perf_counter()
    model.greedy(prompt, 1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.greedy(prompt, tokens + 1)
    return tokens / (time.perf_counter() - start - first)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def isolated_decode_rate(path: Path, tokens: int, head_bf16: bool = False, **load_kwargs) -> dict:
    """``decode_rate`` of ``load_model(path, dtype="bfloat16", **load_kwargs)`` in a fresh process, with its load
    time and format summary. Models loaded one after another in one process get unequal memory placement (the later
    one fewer huge pages), which moved their ratio by more than the targets' 10%; a process each keeps them equal.
    ``head_bf16``: the packed head (and a tied embedding) repacked in bf16 after loading, as other tools' int4 files
    leave it."""
    done = subprocess.run([sys.executable, __file__, str(path), str(tokens), json.dumps(load_kwargs), str(int(head_bf16))],
                          check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_decode_rates(variants: dict[str, tuple[Path, dict]], tokens: int, rounds: int) -> dict[str, dict]:
    """For each variant (name -> (checkpoint, load kwargs)) the best of ``rounds`` isolated_decode_rate results, the
    variants interleaved round by round (this machine's load drifts)."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, (path, kw) in variants.items():
            got = isolated_decode_rate(path, tokens, **kw)
            if name not in best or got["rate"] > best[name]["rate"]:
                best[name] = got
    return best


def _measure(path: str, tokens: str, load_kwargs: str, head_bf16: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from minicpmv.checkpoint import load_model
    from minicpmv.model.fast import PackedEmbedding
    from minicpmv.model.kernels import PackedLinear

    start = time.perf_counter()
    model = load_model(Path(path), dtype="bfloat16", progress=False, **json.loads(load_kwargs))
    load = time.perf_counter() - start
    if int(head_bf16):
        head = model.lm_head
        model.lm_head = PackedLinear(head.dequantized(torch.bfloat16), quant="bf16", out_dtype=torch.float32, parts=head.parts)
        lm = model.model.language_model
        if isinstance(lm.embed_tokens, PackedEmbedding):
            lm.embed_tokens = PackedEmbedding(model.lm_head, torch.bfloat16)
    rate = decode_rate(model, int(tokens))
    print(json.dumps({"rate": rate, "load_seconds": load, "format": getattr(model, "checkpoint_format", None)}))


if __name__ == "__main__":
    _measure(*sys.argv[1:])
