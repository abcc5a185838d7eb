"""AWQ checkpoints (AutoAWQ, GPTQModel's AWQ, llm-compressor's ``awq`` export in the GEMM layout).

Per quantized linear ``<name>``: ``qweight`` int32 [K, N / 8], ``qzeros`` int32 [G, N / 8], ``scales`` fp16 [G, N];
the eight 4-bit fields of a word hold outputs 8 j + (0, 2, 4, 6, 1, 3, 5, 7)[slot] (the GEMM kernel's interleave),
slot 0 in the lowest bits; W[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n], zero points stored as they are.
config.json: ``quantization_config`` with ``quant_method: "awq"``, ``bits``/``w_bit``, ``group_size``/
``q_group_size``, ``version`` and ``zero_point``. Other layouts (GEMV, GEMV_fast, Marlin, ...) are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from minicpmv.errors import CheckpointError
from minicpmv.model.formats import Loaded, SafetensorsFiles, quantization_config
from minicpmv.model.formats.packed import KERNEL_GROUPS, dequantize, to_int4, unpack

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # output within a word's run of eight, per 4-bit slot
LM = "model.language_model."


def settings(section: dict, where: Path) -> int:
    """The group size from ``quantization_config``; unsupported variants named."""
    version = str(section.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"{where}: AWQ version {section.get('version')!r} is not supported (only the GEMM layout)")
    bits = section.get("bits", section.get("w_bit", 4))
    if bits != 4:
        raise CheckpointError(f"{where}: AWQ {bits}-bit checkpoints are not supported (only 4-bit)")
    if section.get("zero_point", True) is False:
        raise CheckpointError(f"{where}: AWQ without zero points (zero_point: false) is not supported")
    group = section.get("group_size", section.get("q_group_size", 128))
    if not isinstance(group, int) or group <= 0:
        raise CheckpointError(f"{where}: AWQ group_size must be a positive integer, got {group!r}")
    return group


def read(source: Path, cfg, dense: bool, progress: bool | None = None) -> Loaded:
    group = settings(quantization_config(source) or {}, source / "config.json")
    files = SafetensorsFiles(source)
    linears = sorted(n[: -len(".qweight")] for n in files.names() if n.endswith(".qweight"))
    parts = {f"{n}.{p}" for n in linears for p in ("qweight", "qzeros", "scales")}
    out = Loaded("awq", {})
    for name in tqdm(linears, desc="unpacking AWQ", unit="linear", disable=None if progress is None else not progress):
        for part in ("qzeros", "scales"):
            if f"{name}.{part}" not in files:
                raise CheckpointError(f"AWQ checkpoint {source}: {name}.qweight has no {name}.{part}")
        qweight, qzeros, scales = (files.get(f"{name}.{p}") for p in ("qweight", "qzeros", "scales"))
        k, n = qweight.shape[0], qweight.shape[1] * 8
        g = -(-k // group)
        if tuple(scales.shape) != (g, n) or tuple(qzeros.shape) != (g, n // 8):
            raise CheckpointError(f"AWQ checkpoint {source}: {name} has inconsistent shapes (qweight "
                                  f"{list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales {list(scales.shape)}; "
                                  f"group_size {group})")
        q, zeros = unpack(qweight, 4, 1, ORDER), unpack(qzeros, 4, 1, ORDER)
        out.types[f"awq int4 g{group} (gemm)"] += 1
        if not dense and (name.startswith(LM) or name == "lm_head") and group in KERNEL_GROUPS:
            out.quantized[name] = to_int4(q, zeros, scales, group)
        else:
            out.tensors[f"{name}.weight"] = dequantize(q, zeros, scales, torch.arange(k) // group)
            if not dense:
                out.dequantized.append(name)
        if f"{name}.bias" in files:
            out.tensors[f"{name}.bias"] = files.get(f"{name}.bias")
            parts.add(f"{name}.bias")
    if out.dequantized:
        out.notes.append("dequantized linears: a group size other than 32/64/128, or outside the language model")
    out.take_the_rest(files, parts)
    return out
