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


def deltanet_decode(layer: nn.Module, x: torch.Tensor, conv: list[torch.Tensor], rec: list[torch.Tensor]):
    """GatedDeltaNet.fused_decode: one token per sequence, the states updated in place by one kernel."""
    for states in (conv, rec):
        for i, t in enumerate(states):
            if not t.is_contiguous():
                states[i] = t.contiguous()
    mixed, z, b, a = layer.project(x)
    return layer.out_proj(kernels.deltanet_decode(layer, mixed, z, b, a, conv, rec))


def _weights(linears: list[nn.Linear], quant: str) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Each linear's weight, or its int8 values and scales when a quantized checkpoint attached them."""
    attached = [getattr(lin, "quantized", None) for lin in linears]
    if all(a is None for a in attached):
        return [lin.weight.detach() for lin in linears], None
    if any(a is None or a[2] != quant for a in attached):
        raise ValueError(f"mixed quantized and unquantized weights for a {quant} layer")
    return [a[0] for a in attached], [a[1] for a in attached]


def _pack(linears: list[nn.Linear], names: dict, quant: str, group: int, gate_up: bool = False, **kw) -> PackedLinear:
    weights, scales = _weights(linears, quant)
    if gate_up:
        weight = interleave_gate_up(*weights)
        scale = None if scales is None else interleave_gate_up(*(s.view(s.shape[0], -1) for s in scales)).squeeze(1)
        kw.update(act="silu_mul", out_features=linears[0].out_features)
    else:
        weight = torch.cat(weights)
        scale = None if scales is None else torch.cat(scales)
    biases = [lin.bias for lin in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    parts = [(names[id(lin)], lin.out_features) for lin in linears]
    return PackedLinear(weight, bias, quant=quant, group=group, scale=scale, parts=parts, **kw)


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
    names = {id(m): n for n, m in model.named_modules()}
    lm = model.model.language_model
    for layer in lm.layers:
        mlp = layer.mlp
        layer.mlp = FusedMLP(
            _pack([mlp.gate_proj, mlp.up_proj], names, quant, group, gate_up=True),
            _pack([mlp.down_proj], names, quant, group),
        )
        if layer.layer_type == "linear_attention":
            attn = layer.linear_attn
            parts = [attn.in_proj_qkv, attn.in_proj_z, attn.in_proj_b, attn.in_proj_a]
            attn.fused_proj = SplitLinear(_pack(parts, names, quant, group), [p.out_features for p in parts])
            attn.out_proj = _pack([attn.out_proj], names, quant, group)
            del attn.in_proj_qkv, attn.in_proj_z, attn.in_proj_b, attn.in_proj_a
            if kernels.available():
                attn.fused_decode = deltanet_decode
        else:
            attn = layer.self_attn
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.fused_proj = SplitLinear(_pack(parts, names, quant, group), [p.out_features for p in parts])
            attn.o_proj = _pack([attn.o_proj], names, quant, group)
            del attn.q_proj, attn.k_proj, attn.v_proj
    if kernels.available():
        for parent in [lm, *lm.layers, *(layer.self_attn for layer in lm.layers if hasattr(layer, "self_attn"))]:
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "RMSNorm":
                    setattr(parent, name, FastRMSNorm(child))
    tied = getattr(model.lm_head, "quantized", None) is not None or model.lm_head.weight is lm.embed_tokens.weight
    tied = tied and model.cfg.tie_word_embeddings
    model.lm_head = _pack([model.lm_head], names, quant, group, out_dtype=torch.float32)
    if tied:
        lm.embed_tokens = PackedEmbedding(model.lm_head, torch.bfloat16)
    model.quantization = quantization
    return model
