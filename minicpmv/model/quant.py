"""Weight-only int8 / int4 checkpoints of the language model: written once, loaded without redoing the work.

The linear layers of the language model and the head are quantized symmetrically: int8 with one float32 scale
per output row, int4 with one bfloat16 scale per row and group of ``group_size`` inputs. A quantized checkpoint
stores, for each such layer ``<name>``, ``<name>.qweight`` (int8 [N, K], or int4 as uint8 [N, K/2] with even k in
the low nibble, value + 8) and ``<name>.scales``; every other tensor is stored as in the bf16 checkpoint (a tied
embedding is not stored: it is read from the head). config.json gains
``"quantization": {"method": "int8" | "int4", "group_size": G}``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minicpmv.model.kernels import BLOCK, PackedLinear, pack_int4_rows

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


@dataclass
class Grouped:
    """A linear's weight from another tool's checkpoint (model/formats), quantized in groups of ``group`` inputs, in
    our plain layout: ``values`` [N, K] int8 (``bits`` 4: -8..7, GPTQ / AWQ / GGUF Q4; 8: -127..127, GGUF Q8_0),
    ``scales`` [N, ceil(K/group)] (float32; float16 for 8 bits) and, for asymmetric formats, ``offsets`` of the
    same shape (float32):
    w[n, k] = scales[n, g] * values[n, k] + offsets[n, g] with g = k // group. Attached to an (empty) nn.Linear as
    ``.quantized``; fast.optimize packs it. With ``perm`` (GPTQ act-order) the columns are in that order of the
    inputs: column j multiplies input perm[j], so each group is contiguous."""

    values: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group: int
    perm: torch.Tensor | None = None
    bits: int = 4

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.values.shape
        groups = torch.arange(k) // self.group
        w = self.values.float() * self.scales.float()[:, groups]
        if self.offsets is not None:
            w += self.offsets.float()[:, groups]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)


def checkpoint_quantization(section: Any) -> tuple[str, int] | None:
    """(method, group_size) from config.json's ``quantization`` section (``ModelConfig.quantization``), else None."""
    if section is None:
        return None
    method = section.get("method") if isinstance(section, dict) else None
    group = section.get("group_size", 0) if isinstance(section, dict) else None
    if method not in METHODS or not isinstance(group, int) or (method == "int4" and group not in GROUP_SIZES):
        raise ValueError(f"unsupported quantization section in config.json: {section!r}")
    return method, group


def quantized_names(model) -> list[str]:
    """The checkpoint names of the linear layers that quantization replaces: the language model's and the head."""
    lm = [f"model.language_model.{n}" for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)]
    return lm + ["lm_head"]


def stored_shapes(name: str, shape: tuple[int, int], method: str, group: int) -> dict[str, tuple[int, ...]]:
    n, k = shape
    if method == "int8":
        return {f"{name}.qweight": (n, k), f"{name}.scales": (n,)}
    return {f"{name}.qweight": (n, -(-k // 2)), f"{name}.scales": (n, -(-k // group))}


def attach(linear: torch.nn.Module, qweight: torch.Tensor, scales: torch.Tensor, method: str) -> None:
    """Give an (empty) nn.Linear its stored quantized weight; fast.optimize unpacks and packs it from there."""
    linear.quantized = (qweight, scales, method)


def _split(packed: PackedLinear) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, values [N, K], scales) of each linear fused into ``packed`` (bf16 weights have no scales)."""
    q, s = packed.quantized()
    if packed.act == "silu_mul":  # 64-row blocks of 32 gate rows then 32 up rows
        (_, n_gate), (_, n_up) = packed.parts
        q, s = (t.reshape(-1, 2, BLOCK // 2, *t.shape[1:]) for t in (q, s))
        q = torch.cat([q[:, 0].flatten(0, 1)[:n_gate], q[:, 1].flatten(0, 1)[:n_up]])
        s = torch.cat([s[:, 0].flatten(0, 1)[:n_gate], s[:, 1].flatten(0, 1)[:n_up]])
    out, start = [], 0
    for name, rows in packed.parts:
        out.append((name, q[start : start + rows], None if s is None else s[start : start + rows]))
        start += rows
    return out


def save_quantized(model, directory: str | Path, source: str | Path | None = None) -> Path:
    """Write a model loaded with ``quantization=...`` as a checkpoint directory of its own, with config.json,
    tokenizer, processor and generation files copied from ``source`` (default: the directory it was loaded from)."""
    method = getattr(model, "quantization", None)
    if method not in METHODS:
        raise ValueError("save_quantized needs a model loaded with quantization='int8' or 'int4'")
    source = Path(source or model.checkpoint_dir)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = list(model.named_modules(remove_duplicate=False))
    packed_names = {n for n, m in modules if isinstance(m, PackedLinear)}
    tensors, group = {}, 0
    for m in {id(m): m for _, m in modules if isinstance(m, PackedLinear)}.values():
        if m.quant == "bf16":  # the vision tower's: stored as in the bf16 checkpoint
            start = 0
            for name, w, _ in _split(m):
                tensors[f"{name}.weight"] = w.contiguous()
                if m.bias is not None:
                    tensors[f"{name}.bias"] = m.bias[start : start + w.shape[0]].to(model.dtype)
                start += w.shape[0]
            continue
        group = m.group or group
        for name, q, s in _split(m):
            tensors[f"{name}.qweight"] = (q if method == "int8" else pack_int4_rows(q)).contiguous()
            tensors[f"{name}.scales"] = s.contiguous()
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in packed_names:
            tensors[name] = t.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for f in source.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja", ".txt", ".model") and not f.name.startswith("model."):
            shutil.copy(f, directory / f.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"method": method, "group_size": group if method == "int4" else 0}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
