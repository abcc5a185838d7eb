"""Swap the language model's linear layers for packed ones (``kernels.PackedLinear``), fusing where it saves work.

For a bf16 model on the CPU (or any quantized one): gate+up become one matmul with silu(gate) * up in its epilogue;
DeltaNet's in_proj_qkv/z/b/a become one; attention's q/k/v become one; down/out/o projections and the head are
packed alone, the head writing float32 logits. A tied embedding then reads its rows from the packed head, so the
big matrix is stored once. Float32 models are left untouched (their numerics are the reference's).
"""

from __future__ import annotations

import torch
from torch import nn

from minicpmv.model import kernels
from minicpmv.model.kernels import PackedLinear, interleave_gate_up

QUANTIZATIONS = (None, "int8", "int4")


class FusedMLP(nn.Module):
    def __init__(self, gate_up: PackedLinear, down: PackedLinear):
        super().__init__()
        self.gate_up, self.down_proj = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x))


class SplitLinear(nn.Module):
    """Several projections of the same input as one matmul; returns the parts."""

    def __init__(self, linear: PackedLinear, sizes: list[int]):
        super().__init__()
        self.linear, self.sizes = linear, sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


class PackedEmbedding(nn.Module):
    """Token embeddings read from the (tied) packed head: rows dequantized on lookup."""

    def __init__(self, head: PackedLinear, dtype: torch.dtype):
        super().__init__()
        self.head, self.dtype = head, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(ids.flatten()).to(self.dtype).view(*ids.shape, -1)


class FastRMSNorm(nn.Module):
    """The zero-centred RMSNorm in one kernel call (bf16)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rmsnorm(x, self.weight, 1.0, self.eps)


class FastDeltaNet(nn.Module):
    """A GatedDeltaNet whose decode steps (every sequence one token) run as one kernel between the projections."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, lengths: list[int], conv: list[torch.Tensor], rec: list[torch.Tensor]):
        if max(lengths) > 1:
            return self.layer(x, lengths, conv, rec)
        for states in (conv, rec):
            for i, t in enumerate(states):
                if not t.is_contiguous():
                    states[i] = t.contiguous()
        mixed, z, b, a = self.layer.project(x)
        return self.layer.out_proj(kernels.deltanet_decode(self.layer, mixed, z, b, a, conv, rec))


def _pack(linears: list[nn.Linear], quant: str, group: int, **kw) -> PackedLinear:
    weight = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
    biases = [lin.bias for lin in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    return PackedLinear(weight.detach(), bias, quant=quant, group=group, **kw)


def optimize(model, quantization: str | None = None, group: int = 64):
    """Pack ``model``'s language model in place (bf16 weights, or int8 / int4 from them); returns the model.

    A no-op for float32 / float16 models, models off the CPU, and bf16 ones where the kernels are unavailable.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        if quantization:
            raise ValueError("int8 / int4 quantization needs a bfloat16 model on the CPU")
        return model
    if quantization is None and not kernels.available():
        return model
    quant = quantization or "bf16"
    lm = model.model.language_model
    for layer in lm.layers:
        mlp = layer.mlp
        gate_up = interleave_gate_up(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach())
        layer.mlp = FusedMLP(
            PackedLinear(gate_up, quant=quant, group=group, act="silu_mul", out_features=mlp.gate_proj.out_features),
            _pack([mlp.down_proj], quant, group),
        )
        if layer.layer_type == "linear_attention":
            attn = layer.linear_attn
            parts = [attn.in_proj_qkv, attn.in_proj_z, attn.in_proj_b, attn.in_proj_a]
            attn.fused_proj = SplitLinear(_pack(parts, quant, group), [p.out_features for p in parts])
            attn.out_proj = _pack([attn.out_proj], quant, group)
            del attn.in_proj_qkv, attn.in_proj_z, attn.in_proj_b, attn.in_proj_a
            if kernels.available():
                layer.linear_attn = FastDeltaNet(attn)
        else:
            attn = layer.self_attn
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.fused_proj = SplitLinear(_pack(parts, quant, group), [p.out_features for p in parts])
            attn.o_proj = _pack([attn.o_proj], quant, group)
            del attn.q_proj, attn.k_proj, attn.v_proj
    if kernels.available():
        for parent in [lm, *lm.layers, *(layer.self_attn for layer in lm.layers if hasattr(layer, "self_attn"))]:
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "RMSNorm":
                    setattr(parent, name, FastRMSNorm(child))
    tied = model.lm_head.weight is lm.embed_tokens.weight
    model.lm_head = _pack([model.lm_head], quant, group, out_dtype=torch.float32)
    if tied:
        lm.embed_tokens = PackedEmbedding(model.lm_head, torch.bfloat16)
    model.quantization = quantization
    return model
