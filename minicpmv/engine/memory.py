"""What a sequence's decoding state costs in bytes (computed from the config), and the default budget for it.

A sequence holds keys and values in each full-attention layer (growing with its length) and, in each Gated-DeltaNet
layer, a conv window and a recurrent matrix (fixed). Admission reserves the state of prompt + max_tokens tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from minicpmv.config import TextConfig
from minicpmv.errors import InvalidInputError

DEFAULT_SHARE = 0.5  # of the memory available when the engine starts


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(cfg: TextConfig, dtype: torch.dtype) -> int:
    n_attn = cfg.layer_types.count("full_attention")
    return n_attn * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_size(dtype)


def fixed_state_bytes(cfg: TextConfig, dtype: torch.dtype) -> int:
    """The DeltaNet layers' conv windows (activation dtype) and recurrent matrices (float32) of one sequence."""
    n_delta = cfg.layer_types.count("linear_attention")
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
    conv = conv_dim * (cfg.linear_conv_kernel_dim - 1) * dtype_size(dtype)
    recurrent = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return n_delta * (conv + recurrent)


def state_bytes(cfg: TextConfig, dtype: torch.dtype, tokens: int) -> int:
    """Bytes of one sequence's state holding ``tokens`` tokens (what HybridState.nbytes() reports)."""
    return fixed_state_bytes(cfg, dtype) + max(tokens, 1) * kv_bytes_per_token(cfg, dtype)


def available_memory(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's free memory, or the machine's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def default_state_budget(device: torch.device) -> int:
    return int(available_memory(device) * DEFAULT_SHARE)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'512MiB', '2GB', '1.5g', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise InvalidInputError(f"a memory size is a positive number with an optional unit (512MiB, 2GB), got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
