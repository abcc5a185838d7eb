"""``optimize(model)``: the CPU fast path for a bf16 model (or an int8 / int4 one), swapped in after loading.

The language model's linear layers become packed ones (``kernels.PackedLinear``), fused where that saves work:
gate+up as one matmul with silu(gate) * up in its epilogue, DeltaNet's in_proj_qkv/z/b/a as one, attention's q/k/v
as one; the head writes float32 logits and a tied embedding reads its rows from it (the big matrix stored once).
With the C++ kernels available, the rest follows: DeltaNet layers run from their projections to out_proj in one
kernel, the RMSNorms in one call each, a whole decode step (every sequence one token) in one call, and the vision
tower's linears and attention run on the same kernels. Float32 models are left untouched: their numerics are the
reference's.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minicpmv.model import kernels, quant
from minicpmv.model import quant as quant_mod  # (``quant`` is also a common parameter name below)
from minicpmv.model.kernels import PackedLinear, interleave_gate_up, unpack_int4_rows
from minicpmv.model.language import RMSNorm

QUANTIZATIONS = (None, *quant.METHODS)
log = logging.getLogger(__name__)


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings share one core's memory bandwidth and FMA units)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))


def set_threads() -> int:
    """Use every physical core for the CPU kernels and PyTorch, unless OMP_NUM_THREADS says otherwise."""
    n = int(os.environ.get("OMP_NUM_THREADS") or physical_cores())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class FusedMLP(nn.Module):
    def __init__(self, gate_up: PackedLinear, down: PackedLinear):
        super().__init__()
        self.gate_up, self.down_proj = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x))


class FusedVisionMLP(nn.Module):
    def __init__(self, fc1: PackedLinear, fc2: PackedLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2  # fc1 applies the tanh gelu in its epilogue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class FastVisionAttention(nn.Module):
    """The vision tower's attention: q, k, v as one matmul, attention within each unit in one kernel."""

    def __init__(self, attn: nn.Module, source: Source):
        super().__init__()
        self.heads, self.head_dim = attn.heads, attn.head_dim
        self.qkv = _pack([attn.q_proj, attn.k_proj, attn.v_proj], source, "bf16", 0)
        self.out_proj = _pack([attn.out_proj], source, "bf16", 0)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        return self.out_proj(kernels.attention_blocks(q, k, v, seqlens))


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


def deltanet_forward(layer: nn.Module, x: torch.Tensor, lengths: list[int], conv: list[torch.Tensor],
                     rec: list[torch.Tensor], cuts: dict[int, int], captured: dict | None) -> torch.Tensor:
    """GatedDeltaNet.fused_forward: prefill chunks and decode steps alike, the states updated in place by one kernel
    (the delta rule token by token in float32: the chunked form's result up to rounding, with the state in cache).
    With ``cuts`` the kernel runs twice: every sequence up to its cut, then the cut ones on from there."""
    for states in (conv, rec):
        for i, t in enumerate(states):
            if not t.is_contiguous():
                states[i] = t.contiguous()
    mixed, z, b, a = layer.project(x)
    if not cuts:
        return layer.out_proj(kernels.deltanet_forward(layer, mixed, z, b, a, lengths, conv, rec))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    core = torch.empty(x.shape[0], layer.value_dim, dtype=torch.bfloat16)
    spans = [[(starts[i], cuts.get(i, n)) for i, n in enumerate(lengths)],
             [(starts[i] + cut, lengths[i] - cut) for i, cut in cuts.items()]]
    for step, part in enumerate(spans):
        rows = torch.cat([torch.arange(start, start + n) for start, n in part])
        which = range(len(lengths)) if step == 0 else list(cuts)
        core[rows] = kernels.deltanet_forward(layer, *(t[rows] for t in (mixed, z, b, a)), [n for _, n in part],
                                              [conv[i] for i in which], [rec[i] for i in which])
        if step == 0:
            for i in cuts:
                captured[i] = (conv[i].clone(), rec[i].clone())
    return layer.out_proj(core)


class FastDecoder:
    """LanguageModel.fused_decode: a decode step (every sequence one token) through all layers in one kernel call.

    The layer descriptors hold pointers to the packed weights, built once: the model must not be moved or converted
    afterwards (it is a CPU inference model; nothing here does). ``lora``, set by ``lora.Registry.activate`` for a
    step with adapter rows: (adapters, their site tables, each row's adapter or -1), added in the kernel.
    """

    @classmethod
    def build(cls, lm: nn.Module) -> FastDecoder | None:
        """The decoder for ``lm``, or None where the kernel does not cover it (then the layers run one by one)."""
        deltanets = [layer.linear_attn for layer in lm.layers if layer.layer_type == "linear_attention"]
        if any(m.fused_forward is None for m in deltanets):
            return None
        if any(getattr(m, "in_perm", None) is not None for m in lm.layers.modules()):
            return None  # (GPTQ act-order: inputs are gathered per matmul, outside the kernel)
        decoder = cls(lm)
        return decoder if decoder.supported else None

    def __init__(self, lm: nn.Module):
        descs = []
        for layer in lm.layers:
            desc = kernels.LayerDesc(in_norm=layer.input_layernorm.weight.data_ptr(),
                                     post_norm=layer.post_attention_layernorm.weight.data_ptr(),
                                     eps=layer.input_layernorm.eps, gate_up=layer.mlp.gate_up.desc,
                                     down=layer.mlp.down_proj.desc)
            if layer.layer_type == "linear_attention":
                m = layer.linear_attn
                desc.kind, desc.proj, desc.out, desc.mixer_eps = 0, m.fused_proj.linear.desc, m.out_proj.desc, m.norm.eps
                desc.hk, desc.hv, desc.dk, desc.dv, desc.kernel = m.k_heads, m.v_heads, m.dk, m.dv, m.kernel
                desc.conv_wt, desc.a_log = m.conv_wt.data_ptr(), m.A_log.data_ptr()
                desc.dt_bias, desc.norm_w = m.dt_bias.data_ptr(), m.norm.weight.data_ptr()
            else:
                m = layer.self_attn
                desc.kind, desc.proj, desc.out, desc.mixer_eps = 1, m.fused_proj.linear.desc, m.o_proj.desc, m.q_norm.eps
                desc.heads, desc.kv_heads, desc.head_dim = m.heads, m.kv_heads, m.head_dim
                desc.q_norm, desc.k_norm = m.q_norm.weight.data_ptr(), m.k_norm.weight.data_ptr()
            descs.append(desc)
        self.layers = (kernels.LayerDesc * len(descs))(*descs)
        self.lora: tuple[int, ctypes.Array, ctypes.Array] | None = None
        self.steps = self.lora_steps = 0  # calls, and those with adapter rows
        self.widths = {  # workspace row widths
            "proj": max(d.proj.n_out for d in descs),
            "core": max(max(d.hv * d.dv, d.heads * d.head_dim) for d in descs),
            "gu": max(d.gate_up.n_out for d in descs),
            "scratch": max((2 * d.hk * d.dk + d.hv * d.dv) * d.kernel + d.hv * (d.dv + 3) for d in descs),
            "gsum": max(lin.k for d in descs for lin in (d.proj, d.out, d.gate_up, d.down)),  # >= 2 K / group
        }
        self.attn_slots = lm.cfg.layer_types.count("full_attention")
        self.kv_shape = (lm.cfg.num_key_value_heads, 1, lm.cfg.head_dim)
        d = lm.cfg.hidden_size
        # The kernel feeds each matmul its input as is: no layer may need its inputs zero-padded (an int4 group
        # longer than a tiny model's width, an odd width).
        self.supported = all(
            (x.proj.k, x.out.k, x.gate_up.k, x.down.k) == (d, max(x.hv * x.dv, x.heads * x.head_dim), d, x.gate_up.n_out)
            and x.dv % 16 == 0 and max(x.dk, x.dv, x.head_dim) <= 512
            for x in descs
        )

    def __call__(self, lm: nn.Module, hidden: torch.Tensor, states: list) -> torch.Tensor:
        n, d = hidden.shape
        hidden = hidden.contiguous()
        positions = [s.length for s in states]
        cos, sin = (t.contiguous() for t in lm.rotary.cos_sin(torch.tensor(positions), hidden.dtype))
        for s in states:
            for i in range(self.attn_slots):  # room for one more key: append_kv grows (the kernel overwrites the zeros)
                if s.length >= s.keys[i].shape[1]:
                    zeros = torch.zeros(self.kv_shape, dtype=hidden.dtype)
                    s.append_kv(i, zeros, zeros)
            for t in (s.conv, s.recurrent):
                for i, x in enumerate(t):
                    if not x.is_contiguous():
                        t[i] = x.contiguous()

        def pointers(kind, tensors):
            return (kind * len(tensors))(*[t.data_ptr() for t in tensors])

        slots = range(len(states[0].conv))
        conv = pointers(ctypes.c_void_p, [s.conv[i] for i in slots for s in states])
        rec = pointers(ctypes.c_void_p, [s.recurrent[i] for i in slots for s in states])
        attn = range(self.attn_slots)
        keys = pointers(ctypes.c_void_p, [s.keys[i] for i in attn for s in states])
        values = pointers(ctypes.c_void_p, [s.values[i] for i in attn for s in states])
        cap = (ctypes.c_int64 * (self.attn_slots * n))(*[s.keys[i].shape[1] for i in attn for s in states])
        pos = (ctypes.c_int64 * n)(*positions)
        w = self.widths
        bufs = [torch.empty(n, width, dtype=dtype) for width, dtype in (
            (d, torch.bfloat16), (w["proj"], torch.bfloat16), (w["core"], torch.bfloat16), (d, torch.bfloat16),
            (w["gu"], torch.bfloat16), (w["scratch"], torch.float32), (w["gsum"], torch.float32))]
        n_adapters, tables, rows = self.lora or (0, None, None)
        self.steps += 1
        self.lora_steps += n_adapters > 0
        kernels._lib.decode_step(len(self.layers), self.layers, n, d, hidden.data_ptr(), lm.norm.weight.data_ptr(),
                                 lm.norm.eps, conv, rec, keys, values, cap, pos, cos.data_ptr(), sin.data_ptr(),
                                 cos.shape[-1], *[b.data_ptr() for b in bufs], n_adapters, tables, rows)
        for s in states:
            s.length += 1
        return hidden


def _foreign(linears: list[nn.Linear], attached: list) -> tuple[str, list, list, list | None, int, torch.Tensor | None] | None:
    """Kernel format, values, scales and offsets of linears another tool's checkpoint quantized (``quant.Grouped``,
    model/formats). A linear it left in bf16 but that is fused with quantized ones here (DeltaNet's in_proj_b /
    in_proj_a beside in_proj_qkv / in_proj_z) is quantized by us, symmetrically, in the same groups and bits."""
    kinds = {(a.group, a.bits) for a in attached if a is not None}
    if len(kinds) != 1:
        raise ValueError(f"linears fused into one have different groups or bits {sorted(kinds)}")
    group, bits = kinds.pop()
    perms = [a.perm for a in attached if a is not None]
    perm = perms[0]
    if any((p is None) != (perm is None) or (p is not None and not torch.equal(p, perm)) for p in perms):
        return None  # (act-order linears of one input normally share their order: it comes from that input)
    values, scales, offsets = [], [], []
    for a, lin in zip(attached, linears):
        if a is None:
            w = lin.weight.detach()
            w = w if perm is None else w[:, perm]
            q, s = kernels.quantize_int4(w, group) if bits == 4 else kernels.quantize_int8_groups(w, group)
            a = quant.Grouped(q, s, None, group, bits=bits)
        values.append(a.values)
        scales.append(a.scales)
        offsets.append(a.offsets if a.offsets is not None else torch.zeros(a.scales.shape))
    if not any(o.any() for o in offsets):  # symmetric (GPTQ sym: every zero point 8; Q8_0): no offsets
        offsets = None
    return ("int4" if bits == 4 else "int8"), values, scales, offsets, group, perm


def _weights(linears: list[nn.Linear], quant: str) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Each linear's weight, or its int8 values and scales when a quantized checkpoint attached them."""
    attached = [getattr(lin, "quantized", None) for lin in linears]
    if all(a is None for a in attached):
        return [lin.weight.detach() for lin in linears], None
    if any(a is None or a[2] != quant for a in attached):
        raise ValueError(f"mixed quantized and unquantized weights for a {quant} layer")
    values = [a[0] if quant == "int8" else unpack_int4_rows(a[0], lin.in_features) for a, lin in zip(attached, linears)]
    return values, [a[1] for a in attached]


def _pack(linears: list[nn.Linear], source: Source, quant: str, group: int, gate_up: bool = False, **kw) -> PackedLinear:
    attached = [getattr(lin, "quantized", None) for lin in linears]
    offsets = None
    foreign = _foreign(linears, attached) if any(isinstance(a, quant_mod.Grouped) for a in attached) else None
    if foreign is not None:  # another tool's checkpoint (model/formats)
        quant, weights, scales, offsets, group, perm = foreign
        if perm is not None:
            kw["in_perm"] = perm
    elif any(isinstance(a, quant_mod.Grouped) for a in attached):  # act-order orders that differ: one matmul in bf16
        names = [source.names[id(lin)] for lin in linears]
        log.warning("%s: different act-order input orders cannot share one quantized matmul: dequantized to bf16", names)
        weights = [lin.weight.detach() if a is None else a.dequantize(torch.bfloat16) for a, lin in zip(attached, linears)]
        scales, quant, group = None, "bf16", 0
    elif source.keep_dense and all(a is None for a in attached):  # left in bf16 by that tool: stays so
        weights, scales, quant, group = [lin.weight.detach() for lin in linears], None, "bf16", 0
    else:
        weights, scales = _weights(linears, quant)

    def join(parts):
        if gate_up:  # int8 scales [N] or group scales [N, K/group]: interleaved like the rows
            return interleave_gate_up(*(s.view(s.shape[0], -1) for s in parts)).view(-1, *parts[0].shape[1:])
        return torch.cat(parts) if len(parts) > 1 else parts[0]  # (a single weight is not copied: the head is big)

    weight = join(weights)
    scale = None if scales is None else join(scales)
    if offsets:
        kw["offsets"] = join(offsets)
    if gate_up:
        kw.update(act="silu_mul", out_features=linears[0].out_features)
    biases = [lin.bias for lin in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    parts = [(source.names[id(lin)], lin.out_features) for lin in linears]
    packed = PackedLinear(weight, bias, quant=quant, group=group, scale=scale, parts=parts, **kw)
    read = [_loaded(getattr(lin, "quantized", None), w) for lin, w in zip(linears, weights)]  # the tensors as loaded
    release_file_pages([*read, *(scales or [])], source.files)
    return packed


def _loaded(attached, weight: torch.Tensor) -> torch.Tensor:
    if attached is None:
        return weight
    return attached.values if isinstance(attached, quant_mod.Grouped) else attached[0]


@dataclass
class Source:
    """What packing needs to know of the loaded model: module names, and the address ranges mapped from files."""

    names: dict[int, str]
    files: list[tuple[int, int]]
    keep_dense: bool = False  # another tool's checkpoint: what it left unquantized is packed in bf16


def file_ranges() -> list[tuple[int, int]]:
    """This process's address ranges mapped from files (those with an inode and a path)."""
    try:
        with open("/proc/self/maps") as f:
            maps = [line.split() for line in f]
    except OSError:
        return []
    return [tuple(int(a, 16) for a in m[0].split("-")) for m in maps if len(m) >= 6 and m[4] != "0" and m[5].startswith("/")]


def release_file_pages(tensors: list[torch.Tensor], files: list[tuple[int, int]] | None = None) -> None:
    """Take the pages of tensors memory-mapped from the checkpoint file out of the resident set. Packing reads each
    weight once; without this every page read stays resident until the whole file is unmapped, and loading peaks
    at the file's size above the packed model. A private file mapping refaults from the file if read again, so
    only ranges inside one (``files``, default: read now; never anonymous memory, which this would zero) are
    released."""
    if _libc is None:
        return
    page, files = mmap.PAGESIZE, file_ranges() if files is None else files
    for t in tensors:
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        for lo, hi in files:
            if lo <= start and end <= hi:
                a, b = max(lo, start // page * page), min(hi, -(-end // page) * page)
                _libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4)  # MADV_DONTNEED
                break


_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
MADV_COLLAPSE = 25  # Linux 6.1+


def collapse_huge_pages(tensors: list[torch.Tensor]) -> None:
    """Back the whole 2 MiB pages of ``tensors`` (packed weights, written once) with transparent huge pages now.
    ``kernels.huge_empty`` only asks for them; where memory was short or fragmented when the weights were written,
    pages stay 4 KiB and stream slower (seen: a second model loaded beside a first got 41% of its packed weights
    on huge pages against the first's 88%). Best effort: a kernel without MADV_COLLAPSE, or no memory for it,
    leaves them as they are; quick where they are huge already."""
    if _libc is None:
        return
    huge = 2 << 20
    for t in tensors:
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        lo, hi = -(-start // huge) * huge, end // huge * huge
        if hi > lo:
            _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_COLLAPSE)


def _pack_vision(model, source: Source) -> None:
    """The vision tower's and the merger's linears in bf16 (their batches are large: this is about compute, and
    the kernel keeps up with oneDNN there), the tanh gelu fused into each encoder fc1."""
    vision = model.model.vision_tower
    for layer in vision.encoder.layers:
        if layer.self_attn.head_dim % 2 == 0:
            layer.self_attn = FastVisionAttention(layer.self_attn, source)
        mlp = layer.mlp
        layer.mlp = FusedVisionMLP(_pack([mlp.fc1], source, "bf16", 0, act="gelu_tanh"), _pack([mlp.fc2], source, "bf16", 0))
    merger = vision.vit_merger
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(merger.self_attn, name, _pack([getattr(merger.self_attn, name)], source, "bf16", 0))
    merger.linear_1 = _pack([merger.linear_1], source, "bf16", 0)
    merger.linear_2 = _pack([merger.linear_2], source, "bf16", 0)
    for mlp in model.model.merger.mlp:
        mlp.linear_1 = _pack([mlp.linear_1], source, "bf16", 0)
        mlp.linear_2 = _pack([mlp.linear_2], source, "bf16", 0)


@torch.no_grad()  # (no autograd graph may keep the original weights alive)
def optimize(model, quantization: str | None = None, group: int = 64, keep_dense: bool | None = None):
    """Pack ``model``'s language model in place (bf16 weights, or int8 / int4 from them); returns the model.

    ``keep_dense`` (default: when another tool's quantized weights are attached, model/formats) packs the linears
    that have none in bf16 instead of quantizing them. A no-op for float32 / float16 models, models off the CPU,
    and bf16 ones where the kernels are unavailable.
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
    if keep_dense is None:
        keep_dense = any(isinstance(getattr(m, "quantized", None), quant_mod.Grouped) for m in model.modules())
    source = Source({id(m): n for n, m in model.named_modules()}, file_ranges(), keep_dense=keep_dense)
    lm = model.model.language_model
    for layer in lm.layers:
        mlp = layer.mlp
        layer.mlp = FusedMLP(
            _pack([mlp.gate_proj, mlp.up_proj], source, quant, group, gate_up=True),
            _pack([mlp.down_proj], source, quant, group),
        )
        if layer.layer_type == "linear_attention":
            attn = layer.linear_attn
            parts = [attn.in_proj_qkv, attn.in_proj_z, attn.in_proj_b, attn.in_proj_a]
            attn.fused_proj = SplitLinear(_pack(parts, source, quant, group), [p.out_features for p in parts])
            attn.out_proj = _pack([attn.out_proj], source, quant, group)
            del attn.in_proj_qkv, attn.in_proj_z, attn.in_proj_b, attn.in_proj_a
            if kernels.available() and attn.dv % 16 == 0 and max(attn.dk, attn.dv) <= 512 and attn.kernel <= 16:
                attn.fused_forward = deltanet_forward
                # the conv weights [kernel, conv_dim] in float32 for the kernel (a plain attribute: not saved)
                attn.conv_wt = attn.conv1d.weight.detach().view(attn.conv_dim, -1).t().float().contiguous()
        else:
            attn = layer.self_attn
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.fused_proj = SplitLinear(_pack(parts, source, quant, group), [p.out_features for p in parts])
            attn.o_proj = _pack([attn.o_proj], source, quant, group)
            del attn.q_proj, attn.k_proj, attn.v_proj
    model.lm_head = _pack([model.lm_head], source, quant, group, out_dtype=torch.float32)
    if model.cfg.tie_word_embeddings:
        lm.embed_tokens = PackedEmbedding(model.lm_head, torch.bfloat16)
    if kernels.available():
        _pack_vision(model, source)
    for module in model.modules():  # own memory for what stays unpacked: nothing then maps the checkpoint file
        if not isinstance(module, PackedLinear):
            for p in module.parameters(recurse=False):
                p.data = p.data.clone()
    if kernels.available():
        for parent in [lm, *lm.layers, *(layer.self_attn for layer in lm.layers if hasattr(layer, "self_attn"))]:
            for name, child in list(parent.named_children()):
                if isinstance(child, RMSNorm):
                    setattr(parent, name, FastRMSNorm(child))
        lm.fused_decode = FastDecoder.build(lm)  # last: it keeps pointers to the final tensors
    collapse_huge_pages([m.weight for m in model.modules() if isinstance(m, PackedLinear)])
    model.quantization = quantization
    return model
