"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum): the language model's linears as int4 with zero points.

Per quantized linear ``<name>``: ``qweight`` int32 [K * bits / 32, N] (the fields of consecutive inputs k in one
word, lowest bits first), ``qzeros`` int32 [G, N * bits / 32] (consecutive outputs likewise), ``scales`` fp16 [G, N]
and ``g_idx`` int32 [K] (each input's group: k // group_size, or a permutation with act-order), optionally ``bias``;
W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]. The v1 format (``checkpoint_format: "gptq"``, the
default) stores each zero point minus one; ``gptq_v2`` stores it as is. config.json's ``quantization_config``
gives ``bits``, ``group_size``, ``desc_act``, ``sym`` and ``checkpoint_format``.

4-bit linears of the language model in groups of 32, 64 or 128 go into our int4 kernels (zero points as per-group
offsets); with act-order (a g_idx that is not k // group) the inputs are permuted at load so that each group is
contiguous, and the activations are gathered in that order before each such matmul. Other group sizes, 2- and
8-bit and anything outside the language model are dequantized; 3-bit and other packings are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from minicpmv.errors import CheckpointError
from minicpmv.model.formats import Loaded, SafetensorsFiles, quantization_config
from minicpmv.model.formats.packed import KERNEL_GROUPS, contiguous_groups, dequantize, group_order, to_int4, unpack

BITS = (2, 4, 8)  # 3-bit fields straddle words: refused
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is added to the stored zero points
LM = "model.language_model."


def settings(section: dict, where: Path) -> tuple[int, int, int]:
    """(bits, group_size, zero-point correction) from ``quantization_config``; unsupported variants named."""
    bits = section.get("bits", 4)
    if bits not in BITS:
        raise CheckpointError(f"{where}: GPTQ {bits}-bit checkpoints are not supported (supported: {list(BITS)} bits)")
    fmt = str(section.get("checkpoint_format") or section.get("format") or "gptq").lower()
    if fmt not in FORMATS:
        raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (supported: {list(FORMATS)})")
    if section.get("dynamic"):
        raise CheckpointError(f"{where}: GPTQ per-module overrides (quantization_config.dynamic) are not supported")
    pack = str(section.get("pack_dtype", "int32")).replace("torch.", "")
    if pack != "int32":
        raise CheckpointError(f"{where}: GPTQ pack_dtype {pack!r} is not supported (only int32)")
    group = section.get("group_size", 128)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise CheckpointError(f"{where}: GPTQ group_size must be a positive integer or -1, got {group!r}")
    return bits, group, FORMATS[fmt]


def read(source: Path, cfg, dense: bool, progress: bool | None = None) -> Loaded:
    section = quantization_config(source) or {}
    bits, group_size, zero_add = settings(section, source / "config.json")
    files = SafetensorsFiles(source)
    linears = sorted(n[: -len(".qweight")] for n in files.names() if n.endswith(".qweight"))
    parts = {f"{n}.{p}" for n in linears for p in ("qweight", "qzeros", "scales", "g_idx")}
    out = Loaded("gptq", {})
    fmt = str(section.get("checkpoint_format") or "gptq").lower()
    kind = f"gptq int{bits} g{group_size}{' act-order' if section.get('desc_act') else ''}{'' if section.get('sym', True) else ' asym'} ({fmt})"
    for name in tqdm(linears, desc="unpacking GPTQ", unit="linear", disable=None if progress is None else not progress):
        qweight = files.get(f"{name}.qweight")
        if qweight.dtype != torch.int32:
            raise CheckpointError(f"GPTQ checkpoint {source}: {name}.qweight is {qweight.dtype}, not int32")
        per = 32 // bits
        k, n = qweight.shape[0] * per, qweight.shape[1]
        for part in ("qzeros", "scales"):
            if f"{name}.{part}" not in files:
                raise CheckpointError(f"GPTQ checkpoint {source}: {name}.qweight has no {name}.{part}")
        q = unpack(qweight, bits, 0)  # [K, N]
        zeros = unpack(files.get(f"{name}.qzeros"), bits, 1)[:, :n] + zero_add  # [G, N]
        scales = files.get(f"{name}.scales")
        if f"{name}.g_idx" in files:
            groups = files.get(f"{name}.g_idx").long()
        else:
            groups = torch.arange(k) // (k if group_size == -1 else group_size)
        g = scales.shape[0]
        if scales.shape[1] != n or zeros.shape[0] != g or groups.numel() != k or groups.min() < 0 or groups.max() >= g:
            raise CheckpointError(f"GPTQ checkpoint {source}: {name} has inconsistent shapes (qweight "
                                  f"{list(qweight.shape)}, qzeros {list(files.shapes[name + '.qzeros'])}, scales "
                                  f"{list(scales.shape)}, g_idx {groups.numel()})")
        out.types[kind] += 1
        contiguous, perm = contiguous_groups(groups, k), None
        if contiguous is None:  # act-order: the inputs permuted at load so that groups are contiguous
            contiguous, perm = group_order(groups, k) or (None, None)
        if not dense and bits == 4 and (name.startswith(LM) or name == "lm_head") and contiguous in KERNEL_GROUPS:
            out.quantized[name] = to_int4(q, zeros, scales, contiguous, perm)
        else:
            out.tensors[f"{name}.weight"] = dequantize(q, zeros, scales, groups)
            if not dense:
                out.dequantized.append(name)
        if f"{name}.bias" in files:
            out.tensors[f"{name}.bias"] = files.get(f"{name}.bias")
            parts.add(f"{name}.bias")
    if out.dequantized:
        why = "a group size other than 32/64/128 (or groups of unequal size), not 4-bit, or outside the language model"
        out.notes.append(f"dequantized linears: {why}")
    out.take_the_rest(files, parts)
    return out
