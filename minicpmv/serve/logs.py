"""The server's log lines: one start-up summary, and one access line per request."""

from __future__ import annotations

import logging
import os

import torch

from minicpmv.engine.memory import fixed_state_bytes, human, kv_bytes_per_token

log = logging.getLogger("minicpmv.serve")
access_log = logging.getLogger("minicpmv.access")


def kernel_isa(llm) -> str:
    """Which decode kernels run: the AVX-512 BF16 C++ kernels, or plain PyTorch (known once they were tried)."""
    from minicpmv.model import kernels

    if llm.model.device.type != "cpu":
        return f"{llm.model.device.type} (PyTorch)"
    isa = getattr(kernels, "ISA", None)  # set by kernel builds that report it
    if isa:
        return str(isa)
    if os.environ.get("MINICPMV_NO_KERNELS") or not kernels.cpu_supported() or llm.dtype != "bfloat16":
        return "none (PyTorch)"
    return "avx512_bf16 (C++ kernels)"


def weights_summary(info: dict) -> str:
    """A foreign checkpoint's formats.Loaded.info() in one line."""
    types = ", ".join(f"{name} x{count}" for name, count in info["types"].items())
    text = f"{info['format']}: {types}; {info['quantized_linears']} linears in the {info['kernels']} kernels"
    return text + (f"; dequantized: {info['dequantized']}" if info["dequantized"] else "")


def startup_summary(llm, config) -> str:
    engine = llm.engine
    ec = engine.config
    text = llm.model.cfg.text
    parts = [
        f"model={config.model_name} ({llm.name})" + (" DEMO: random weights" if llm.demo else ""),
        f"device={llm.model.device}",
        f"dtype={llm.dtype}",
        f"quantization={llm.quantization or 'none'}",
        *([f"weights=[{weights_summary(llm.weights_format)}]"] if getattr(llm, "weights_format", None) else []),
        f"kernels={kernel_isa(llm)}",
        f"threads={torch.get_num_threads()}",
        f"context={engine.max_model_len}",
        f"max_num_seqs={ec.max_num_seqs}",
        f"max_waiting={ec.max_waiting}",
        f"default_max_tokens={config.default_max_tokens or 'rest of context'}",
        f"state_memory={human(engine.state_budget)} ({human(kv_bytes_per_token(text, llm.model.dtype))}/token"
        f" + {human(fixed_state_bytes(text, llm.model.dtype))}/sequence)",
        f"prefix_cache={human(ec.prefix_cache_bytes)}",
        f"vision_cache={human(ec.vision_cache_bytes)}",
    ]
    return "start-up: " + " ".join(parts)


def log_startup(llm, config) -> None:
    log.info(startup_summary(llm, config))


def access(request_id: str, status: int, usage=None, ttft: float | None = None, total: float = 0.0,
           finish: str | None = None, note: str = "") -> None:
    """One line per request: id, status, prompt / cached / completion tokens, time to first token, total, finish."""
    tokens = (f"prompt={usage.prompt_tokens} cached={usage.cached_tokens} completion={usage.completion_tokens}"
              if usage is not None else "prompt=- cached=- completion=-")
    first = f"{ttft:.3f}s" if ttft is not None else "-"
    access_log.info("%s %d %s ttft=%s total=%.3fs finish=%s%s", request_id, status, tokens, first, total,
                    finish or "-", f" {note}" if note else "")
