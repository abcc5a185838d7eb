"""bitsandbytes 4-bit checkpoints (NF4 or FP4, ``save_pretrained`` of a ``load_in_4bit`` model): dequantized at load.

Per quantized linear ``<name>``: ``weight`` uint8 [ceil(N K / 2), 1] (two 4-bit codes a byte, the first element in
the high nibble), ``weight.quant_map`` float32 [16] (the NF4 or FP4 code values), ``weight.absmax`` (float32 per
block of ``blocksize`` elements, or with double quantization uint8 codes into ``weight.nested_quant_map`` [256]
scaled per ``nested_blocksize`` codes by ``weight.nested_absmax``, plus ``nested_offset``) and
``weight.quant_state.bitsandbytes__<type>`` (uint8 bytes of a JSON object: quant_type, blocksize, shape, dtype,
nested_blocksize, nested_offset). W = quant_map[code] * absmax[i // blocksize], in row-major ``shape``.

Blocks of 64 run along the rows' flattened elements, not per output and group: nothing here maps onto the int4
kernels exactly, so every quantized weight is dequantized (to the load dtype) and the load says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from minicpmv.errors import CheckpointError
from minicpmv.model.formats import Loaded, SafetensorsFiles, quantization_config

STATE = ".weight.quant_state.bitsandbytes__"
TYPES = ("nf4", "fp4")


def settings(section: dict, where: Path) -> None:
    if section.get("load_in_8bit"):
        raise CheckpointError(f"{where}: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported (4-bit NF4/FP4 are)")
    if not section.get("load_in_4bit", False):
        raise CheckpointError(f"{where}: a bitsandbytes quantization_config without load_in_4bit is not supported")
    kind = str(section.get("bnb_4bit_quant_type", "fp4")).lower()
    if kind not in TYPES:
        raise CheckpointError(f"{where}: bitsandbytes 4-bit type {kind!r} is not supported (supported: {list(TYPES)})")


def state(files: SafetensorsFiles, name: str) -> tuple[str, dict]:
    """(the state tensor's name, its JSON) for linear ``name``."""
    found = [n for n in files.names() if n.startswith(f"{name}{STATE}")]
    if len(found) != 1:
        raise CheckpointError(f"bitsandbytes checkpoint {files.directory}: {name}.weight has no quant_state")
    try:
        meta = json.loads(bytes(files.get(found[0]).flatten().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"bitsandbytes checkpoint {files.directory}: {found[0]} is not JSON ({exc})") from None
    return found[0], meta


def dequantize(files: SafetensorsFiles, name: str, meta: dict) -> torch.Tensor:
    """The float32 weight of linear ``name``."""
    kind = meta.get("quant_type")
    if kind not in TYPES:
        raise CheckpointError(f"bitsandbytes checkpoint {files.directory}: {name} has 4-bit type {kind!r} "
                              f"(supported: {list(TYPES)})")
    shape, block = [int(s) for s in meta["shape"]], int(meta["blocksize"])
    count = 1
    for s in shape:
        count *= s
    packed = files.get(f"{name}.weight").flatten()
    codes = torch.stack([packed >> 4, packed & 15], -1).flatten()[:count].long()
    absmax = files.get(f"{name}.weight.absmax")
    if f"{name}.weight.nested_absmax" in files:  # double quantization: the absmax values are 8-bit codes themselves
        nested = files.get(f"{name}.weight.nested_absmax").float()
        table = files.get(f"{name}.weight.nested_quant_map").float()
        nb = int(meta.get("nested_blocksize", 256))
        idx = torch.arange(absmax.numel()) // nb
        absmax = table[absmax.long()] * nested[idx] + float(meta.get("nested_offset", 0.0))
    absmax = absmax.float()
    if absmax.numel() != -(-count // block) or packed.numel() * 2 < count:
        raise CheckpointError(f"bitsandbytes checkpoint {files.directory}: {name} has {absmax.numel()} absmax values "
                              f"and {packed.numel()} bytes for shape {shape} in blocks of {block}")
    values = files.get(f"{name}.weight.quant_map").float()[codes]
    return (values * absmax.repeat_interleave(block)[:count]).view(shape)


def read(source: Path, cfg, dense: bool, progress: bool | None = None) -> Loaded:
    settings(quantization_config(source) or {}, source / "config.json")
    files = SafetensorsFiles(source)
    linears = sorted({n[: n.index(STATE)] for n in files.names() if STATE in n})
    out = Loaded("bnb-nf4", {})
    used = set()
    for name in tqdm(linears, desc="dequantizing bitsandbytes", unit="linear",
                     disable=None if progress is None else not progress):
        state_name, meta = state(files, name)
        out.tensors[f"{name}.weight"] = dequantize(files, name, meta)
        out.types[f"bnb {meta['quant_type']} block {meta['blocksize']}{' double-quant' if f'{name}.weight.nested_absmax' in files else ''}"] += 1
        out.dequantized.append(name)
        used |= {state_name, *(f"{name}.weight.{p}" for p in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"))}
    out.format = f"bnb-{meta['quant_type']}" if linears else out.format
    if linears:
        out.notes.append("bitsandbytes 4-bit blocks do not map onto the int4 kernels: every quantized linear is "
                         "dequantized")
    out.take_the_rest(files, used)
    return out
