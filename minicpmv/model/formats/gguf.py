"""llama.cpp GGUF files: the language model (architecture ``qwen35``) plus its vision projector ("mmproj", a second
file; one per 4x/16x mode, the 4x one without the window merger), read with the ``gguf`` package
(``pip install minicpmv[gguf]``).

``prepare(path, mmproj)`` turns the pair into a checkpoint directory our loader and processor read (cached, keyed by
the files): config.json from the files' metadata (with ``"gguf": {...}`` naming them), tokenizer.json (a
tokenizer.json beside the file, else the embedded vocabulary in our tokenizer skeleton; either way checked against
the embedded vocabulary by the ids of a probe text), the chat template (a chat_template.jinja beside the file, else
the embedded one, else ours) and the processor files. ``read`` then maps llama.cpp's tensor names back onto ours and
undoes what convert_hf_to_gguf.py did to them (norm weights stored as 1 + w, A_log stored as -exp(A_log), the conv
kernel squeezed, DeltaNet value heads reordered from grouped to tiled when there are more value than key heads).

Types: F32 / F16 / BF16 are dense; Q4_0, Q4_1 and Q4_K (per 32 values: w = s * q + m, q in 0..15) go into the int4
kernels with offsets, Q8_0 (w = d * q, q in -127..127) into the int8 kernels with a scale per group, both in groups
of 32; every other type (Q5_*, Q6_K, ...) is dequantized with gguf's numpy dequantizers, and said so. A float32
load (or off the CPU) dequantizes everything: the exact reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from minicpmv.errors import CheckpointError
from minicpmv.model import quant
from minicpmv.model.formats import Loaded, gguf_source

log = logging.getLogger(__name__)

VERSION = "1"  # bump when what prepare() writes changes
LM = "model.language_model"
PROBE = "Hello, world! MiniCPM-V 4.6 reads 1234 images.\n<|im_start|>user\n你好，世界 <think>ok</think> ça va? 🙂"
DENSE = ("F32", "F16", "BF16")
INT4 = ("Q4_0", "Q4_1", "Q4_K")  # exact in the int4-with-offsets kernels, groups of 32
INT8 = ("Q8_0",)  # exact in the grouped int8 kernels, groups of 32
# everything else we read is dequantized; a type outside these lists is refused
DEQUANTIZED = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS", "IQ3_S",
               "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4")

# llama.cpp name (after "blk.N.") -> ours (after "<LM>.layers.N."); from gguf-py's tensor_mapping for QWEN35
LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ssm_a": "linear_attn.A_log",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
}
TOP = {"token_embd.weight": f"{LM}.embed_tokens.weight", "output_norm.weight": f"{LM}.norm.weight",
       "output.weight": "lm_head.weight"}
VT = "model.vision_tower"
VISION_LAYER = {  # "v.blk.N." -> "<VT>.encoder.layers.N."
    "ln1": "layer_norm1", "ln2": "layer_norm2", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
}
VISION = {
    "v.patch_embd": f"{VT}.embeddings.patch_embedding", "v.position_embd": f"{VT}.embeddings.position_embedding",
    "v.post_ln": f"{VT}.post_layernorm",
    "v.vit_merger.ln1": f"{VT}.vit_merger.layer_norm1", "v.vit_merger.attn_q": f"{VT}.vit_merger.self_attn.q_proj",
    "v.vit_merger.attn_k": f"{VT}.vit_merger.self_attn.k_proj", "v.vit_merger.attn_v": f"{VT}.vit_merger.self_attn.v_proj",
    "v.vit_merger.attn_out": f"{VT}.vit_merger.self_attn.out_proj", "v.vit_merger.ds_ln": f"{VT}.vit_merger.pre_norm",
    "v.vit_merger.ds_ffn_up": f"{VT}.vit_merger.linear_1", "v.vit_merger.ds_ffn_down": f"{VT}.vit_merger.linear_2",
    "mm.input_norm": "model.merger.mlp.0.pre_norm", "mm.up": "model.merger.mlp.0.linear_1",
    "mm.down": "model.merger.mlp.0.linear_2",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the `gguf` package: pip install 'minicpmv[gguf]'") from None
    return gguf


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).endswith(".gguf")


class Tensor:
    """One tensor of a GGUF file: its type, llama.cpp shape (ne0 first) and raw bytes (memory-mapped)."""

    def __init__(self, name: str, shape: tuple[int, ...], kind: int, data: np.ndarray):
        self.name, self.shape, self.kind, self.raw = name, shape, kind, data

    @property
    def type_name(self) -> str:
        gguf = _gguf()
        try:
            return gguf.GGMLQuantizationType(self.kind).name
        except ValueError:
            return f"#{self.kind} (unknown)"


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class File:
    """One GGUF file's metadata and tensors. The header is parsed here (gguf.GGUFReader takes most of a minute over
    the 750k vocabulary strings); the tensor data is memory-mapped and dequantized by the gguf package."""

    def __init__(self, path: Path):
        import struct

        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        try:
            buf = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from None
        mv = memoryview(buf)
        pos = 0

        def take(fmt: str):
            nonlocal pos
            value = struct.unpack_from(fmt, mv, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            value = bytes(mv[pos : pos + n]).decode("utf-8", errors="replace")
            pos += n
            return value

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = take("<I"), take("<Q")
                return [value(item) for _ in range(count)]
            return take(_SCALARS[kind])

        try:
            if bytes(mv[:4]) != b"GGUF":
                raise ValueError("no GGUF magic number")
            pos = 4
            version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version}")
            self.fields: dict = {}
            for _ in range(n_kv):
                key = string()
                self.fields[key] = value(take("<I"))
            infos = []
            for _ in range(n_tensors):
                name = string()
                dims = tuple(take("<Q") for _ in range(take("<I")))
                infos.append((name, dims, take("<I"), take("<Q")))
            align = int(self.fields.get("general.alignment", 32))
            start = -(-pos // align) * align
            gguf = _gguf()
            self.tensors = {}
            for name, dims, kind, offset in infos:
                known = kind in gguf.GGMLQuantizationType._value2member_map_
                block, size = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(kind), (1, 0)) if known else (1, 0)
                rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
                row_bytes = dims[0] // block * size
                data = buf[start + offset : start + offset + rows * row_bytes] if size else buf[:0]
                if size and data.size != rows * row_bytes:
                    raise ValueError(f"tensor {name} runs past the end of the file")
                self.tensors[name] = Tensor(name, dims, kind, data.reshape(rows, row_bytes) if size else data)
        except (ValueError, struct.error, KeyError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable GGUF file ({exc}; truncated or corrupt download?)") from None

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata {key} is missing")
        return value

    @property
    def kind(self) -> str:
        return str(self.get("general.type", "model"))

    def type_name(self, name: str) -> str:
        return self.tensors[name].type_name

    def array(self, name: str) -> np.ndarray:
        """The tensor as float32 in its logical shape (numpy order: the last dimension is llama.cpp's ne0)."""
        gguf = _gguf()
        t = self.tensors[name]
        kind = t.type_name
        if kind not in DENSE + INT4 + INT8 + DEQUANTIZED:
            raise CheckpointError(f"{self.path}: tensor {name} has GGUF type {kind}, which minicpmv does not read "
                                  f"(supported: {', '.join(DENSE + INT4 + INT8 + DEQUANTIZED)})")
        shape = tuple(int(d) for d in reversed(t.shape))
        data = gguf.quants.dequantize(np.ascontiguousarray(t.raw), gguf.GGMLQuantizationType(t.kind))
        return np.asarray(data, dtype=np.float32).reshape(shape)


# --- the int4 kernels' view of Q4_0 / Q4_1 / Q4_K -----------------------------------------------------------------


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def int4_parts(kind: str, raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [rows, cols] in -8..7, scales and offsets [rows, cols/32]) with w = scale * value + offset, from a
    Q4_0 / Q4_1 / Q4_K tensor's raw blocks (uint8 [rows, bytes per row])."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(rows, -1)
    if kind in ("Q4_0", "Q4_1"):
        head = 2 if kind == "Q4_0" else 4
        blocks = raw.reshape(rows, cols // 32, head + 16)
        d = _f16(blocks[..., 0:2])
        m = _f16(blocks[..., 2:4]) if kind == "Q4_1" else -8 * d  # Q4_0: w = d * (q - 8)
        qs = blocks[..., head:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1)  # element j: low nibble of byte j, j + 16: its high nibble
        scales, offsets = d, m
    elif kind == "Q4_K":  # super-blocks of 256: d, dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes
        blocks = raw.reshape(rows, cols // 256, 144)
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        s = blocks[..., 4:16].astype(np.uint8)
        lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 2) & 48)], axis=-1).astype(np.float32)
        mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 2) & 48)], axis=-1).astype(np.float32)
        qs = blocks[..., 16:].reshape(rows, cols // 256, 4, 32)  # 4 chunks of 64 values: low nibbles, then high
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, cols // 256, 8, 32)
        scales = (d[..., None] * sc).reshape(rows, -1)
        offsets = (-(dmin[..., None] * mn)).reshape(rows, -1)
    else:
        raise ValueError(kind)
    q = q.reshape(rows, cols).astype(np.int8)
    scales = scales.reshape(rows, -1).astype(np.float32)
    offsets = offsets.reshape(rows, -1).astype(np.float32)
    return q - 8, scales, offsets + 8 * scales  # values centred on 0 like ours


def int8_parts(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [rows, cols] in -127..127, scales [rows, cols/32]) with w = scale * value, from a Q8_0 tensor's raw
    blocks (per 32 values: an fp16 scale, then the 32 int8 values)."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // 32, 34)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]  # kept in fp16, as the kernels take them
    return np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, cols), scales


# --- names and the converter's transforms -------------------------------------------------------------------------


def our_name(name: str) -> str | None:
    if name in TOP:
        return TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in LAYER:
        return f"{LM}.layers.{m.group(1)}.{LAYER[m.group(2)]}"
    m = re.fullmatch(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in VISION_LAYER:
        return f"{VT}.encoder.layers.{m.group(1)}.{VISION_LAYER[m.group(2)]}.{m.group(3)}"
    base, _, leaf = name.rpartition(".")
    if base in VISION and leaf in ("weight", "bias"):
        return f"{VISION[base]}.{leaf}"
    return None


def _untile(x: np.ndarray, axis: int, k_heads: int, v_per_k: int, head: int) -> np.ndarray:
    """Undo the converter's value-head reorder along ``axis``: tiled [v_per_k, k_heads, head] -> grouped
    [k_heads, v_per_k, head]."""
    x = np.moveaxis(x, axis, 0)
    shape = x.shape
    x = x.reshape(v_per_k, k_heads, head, *shape[1:]).swapaxes(0, 1).reshape(shape)
    return np.moveaxis(x, 0, axis)


def rows_permutation(name: str, cfg) -> np.ndarray | None:
    """The row order that turns a converted DeltaNet weight's rows back into ours (None: unchanged)."""
    t = cfg.text
    k_heads, v_heads = t.linear_num_key_heads, t.linear_num_value_heads
    if k_heads == v_heads or ".linear_attn." not in name:
        return None
    v_per_k = v_heads // k_heads
    if name.endswith((".in_proj_qkv.weight", ".conv1d.weight")):
        qk = 2 * k_heads * t.linear_key_head_dim
        v = qk + _untile(np.arange(v_heads * t.linear_value_head_dim), 0, k_heads, v_per_k, t.linear_value_head_dim)
        return np.concatenate([np.arange(qk), v])
    if name.endswith(".in_proj_z.weight"):
        return _untile(np.arange(v_heads * t.linear_value_head_dim), 0, k_heads, v_per_k, t.linear_value_head_dim)
    if name.endswith((".in_proj_a.weight", ".in_proj_b.weight", ".A_log", ".dt_bias")):
        return _untile(np.arange(v_heads), 0, k_heads, v_per_k, 1)
    return None


def columns_permutation(name: str, cfg) -> np.ndarray | None:
    t = cfg.text
    k_heads, v_heads = t.linear_num_key_heads, t.linear_num_value_heads
    if k_heads == v_heads or not name.endswith(".linear_attn.out_proj.weight"):
        return None
    return _untile(np.arange(v_heads * t.linear_value_head_dim), 0, k_heads, v_heads // k_heads,
                   t.linear_value_head_dim)


def restore(name: str, x: np.ndarray, cfg) -> np.ndarray:
    """A converted tensor (float32, our name) back to the value our model reads."""
    if name.endswith(".A_log"):
        x = np.log(-x)  # stored as -exp(A_log)
    elif name.endswith(".conv1d.weight"):
        x = x[:, None, :]  # [channels, kernel] -> [channels, 1, kernel]
    elif name.startswith(LM) and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        x = x - 1  # RMSNorm(1 + w) stored as 1 + w
    rows, cols = rows_permutation(name, cfg), columns_permutation(name, cfg)
    if rows is not None:
        x = x[rows]
    if cols is not None:
        x = x[:, cols]
    return np.array(x, dtype=np.float32)  # a writable copy (the file is mapped read-only)


# --- config, tokenizer and the checkpoint directory ---------------------------------------------------------------


def model_config(lm: File, mm: File, vocab_rows: int) -> dict:
    """config.json for the pair: the official config with every size the files state."""
    from minicpmv.demo import official_config

    arch = str(lm.need("general.architecture"))
    if arch != "qwen35":
        raise CheckpointError(f"{lm.path}: GGUF architecture {arch!r} is not MiniCPM-V 4.6's language model (qwen35)")
    if mm.kind != "mmproj" or str(mm.get("clip.projector_type", "")) != "minicpmv4_6":
        raise CheckpointError(f"{mm.path}: not a MiniCPM-V 4.6 vision projector (general.type {mm.kind!r}, "
                              f"clip.projector_type {mm.get('clip.projector_type')!r})")
    raw = official_config()
    p = "qwen35."
    heads = int(lm.need(p + "attention.head_count"))
    head_dim = int(lm.need(p + "attention.key_length"))
    recurrent = [bool(r) for r in lm.need(p + "attention.recurrent_layers")]
    text = raw["text_config"]
    text.update(
        hidden_size=int(lm.need(p + "embedding_length")), intermediate_size=int(lm.need(p + "feed_forward_length")),
        num_hidden_layers=int(lm.need(p + "block_count")), num_attention_heads=heads,
        num_key_value_heads=int(lm.need(p + "attention.head_count_kv")), head_dim=head_dim,
        layer_types=["linear_attention" if r else "full_attention" for r in recurrent],
        linear_conv_kernel_dim=int(lm.need(p + "ssm.conv_kernel")),
        linear_key_head_dim=int(lm.need(p + "ssm.state_size")),
        linear_num_key_heads=int(lm.need(p + "ssm.group_count")),
        linear_num_value_heads=int(lm.need(p + "ssm.time_step_rank")),
        rms_norm_eps=float(lm.need(p + "attention.layer_norm_rms_epsilon")),
        vocab_size=vocab_rows, tie_word_embeddings="output.weight" not in lm.tensors,
        mtp_num_hidden_layers=0,
    )
    text["linear_value_head_dim"] = int(lm.need(p + "ssm.inner_size")) // text["linear_num_value_heads"]
    factor = int(lm.need(p + "rope.dimension_count")) / head_dim
    text["partial_rotary_factor"] = factor
    text["rope_parameters"] = {**text["rope_parameters"], "rope_theta": float(lm.need(p + "rope.freq_base")),
                               "partial_rotary_factor": factor}
    if lm.get(p + "context_length"):
        text["max_position_embeddings"] = int(lm.get(p + "context_length"))
    vision = raw["vision_config"]
    patch = int(mm.need("clip.vision.patch_size"))
    positions = int(mm.tensors["v.position_embd.weight"].shape[1]) if "v.position_embd.weight" in mm.tensors else 0
    vision.update(
        hidden_size=int(mm.need("clip.vision.embedding_length")),
        intermediate_size=int(mm.need("clip.vision.feed_forward_length")),
        num_hidden_layers=int(mm.need("clip.vision.block_count")),
        num_attention_heads=int(mm.need("clip.vision.attention.head_count")),
        patch_size=patch, layer_norm_eps=float(mm.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        image_size=int(round(positions ** 0.5)) * patch,  # the position bucket grid (clip.vision.image_size is the slice size)
    )
    raw["insert_layer_id"] = int(mm.need("clip.vision.wa_layer_indexes")[0])
    raw["tie_word_embeddings"] = text["tie_word_embeddings"]
    return raw


def downsample_modes(mm: File) -> list[str]:
    """The modes an mmproj serves: 16x needs the window merger (a 4x file has none; 4x just skips it)."""
    return ["16x", "4x"] if any(n.startswith("v.vit_merger.") for n in mm.tensors) else ["4x"]


def find_mmproj(lm_path: Path) -> Path:
    """The vision projector beside an LM file: the one mmproj GGUF there, or of several the 16x one (it serves 4x
    too)."""
    found = []
    for f in sorted(lm_path.parent.glob("*.gguf")):
        if f != lm_path:
            mm = File(f)
            if mm.kind == "mmproj":
                found.append((len(downsample_modes(mm)), f))
    if not found:
        raise CheckpointError(f"no vision projector (mmproj) GGUF beside {lm_path}; pass it with --mmproj FILE "
                              "(LLM(..., mmproj=FILE))")
    found.sort(key=lambda t: -t[0])
    return found[0][1]


def embedded_tokenizer(lm: File) -> dict:
    """tokenizer.json from the file's own vocabulary and merges, in our (Qwen3.5) tokenizer skeleton."""
    from minicpmv.processing.tokenizer_build import ASSETS

    if str(lm.get("tokenizer.ggml.model", "")) != "gpt2":
        raise CheckpointError(f"{lm.path}: embedded tokenizer model {lm.get('tokenizer.ggml.model')!r} is not the "
                              "byte-level BPE (gpt2) of MiniCPM-V 4.6")
    tokens = [str(t) for t in lm.need("tokenizer.ggml.tokens")]
    merges = [str(m).split(" ", 1) for m in lm.need("tokenizer.ggml.merges")]
    result = json.loads((ASSETS / "tokenizer_skeleton.json").read_text())
    first_added = min(t["id"] for t in result["added_tokens"])
    wrong = [f"{t['id']}: {tokens[t['id']]!r} (expected {t['content']!r})" if t["id"] < len(tokens) else
             f"{t['id']}: missing (expected {t['content']!r})" for t in result["added_tokens"]
             if t["id"] >= len(tokens) or tokens[t["id"]] != t["content"]]
    if wrong:
        raise CheckpointError(f"{lm.path}: the embedded tokenizer is not MiniCPM-V 4.6's; special tokens differ at "
                              + "; ".join(wrong[:5]))
    result["model"]["vocab"] = {t: i for i, t in enumerate(tokens[:first_added])}
    result["model"]["merges"] = merges
    return result


def check_tokenizer(lm: File, ours: Path | None, embedded: dict) -> None:
    """The ids of a probe text under the tokenizer we will use equal those under the file's embedded vocabulary."""
    from tokenizers import Tokenizer

    if ours is None:
        return
    theirs = Tokenizer.from_str(json.dumps(embedded)).encode(PROBE).ids
    mine = Tokenizer.from_file(str(ours)).encode(PROBE).ids
    if mine != theirs:
        at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise CheckpointError(
            f"{ours} does not match the tokenizer embedded in {lm.path}: the probe text {PROBE!r} gives ids differing "
            f"from position {at} on ({mine[at:at + 4]} vs the file's {theirs[at:at + 4]})")


def _key(*paths: Path) -> str:
    h = hashlib.sha256(VERSION.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        beside = p.parent / "tokenizer.json", p.parent / "chat_template.jinja"
        for b in beside:
            if b.exists():
                h.update(f"{b}|{b.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def prepare(path: str | os.PathLike, mmproj: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory for an LM GGUF and its mmproj (found beside it unless given), built once."""
    from minicpmv.processing.tokenizer_build import ASSETS, CHECKPOINT_ASSETS, cache_dir

    lm_path = Path(path).expanduser().resolve()
    lm = File(lm_path)
    if lm.kind == "mmproj":
        raise CheckpointError(f"{lm_path} is a vision projector (mmproj); give the language-model GGUF, with this "
                              "file as --mmproj")
    mm_path = Path(mmproj).expanduser().resolve() if mmproj else find_mmproj(lm_path)
    target = cache_dir() / "gguf" / _key(lm_path, mm_path)
    if (target / "config.json").exists():
        return target
    _prune(target.parent)
    mm = File(mm_path)
    vocab_rows = int(lm.tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in lm.tensors else 0
    raw = model_config(lm, mm, vocab_rows)
    modes = downsample_modes(mm)
    raw["gguf"] = {"model": str(lm_path), "mmproj": str(mm_path), "downsample_modes": modes}
    tmp = Path(tempfile.mkdtemp(prefix="gguf-", dir=_mkdir(target.parent)))
    for name in CHECKPOINT_ASSETS:
        (tmp / name).write_bytes((ASSETS / name).read_bytes())
    embedded = embedded_tokenizer(lm)
    beside = lm_path.parent / "tokenizer.json"
    if beside.exists():
        check_tokenizer(lm, beside, embedded)
        (tmp / "tokenizer.json").write_bytes(beside.read_bytes())
    else:
        (tmp / "tokenizer.json").write_text(json.dumps(embedded, ensure_ascii=False), encoding="utf-8")
    template = lm_path.parent / "chat_template.jinja"
    if template.exists():
        (tmp / "chat_template.jinja").write_bytes(template.read_bytes())
    elif lm.get("tokenizer.chat_template"):
        (tmp / "chat_template.jinja").write_text(str(lm.get("tokenizer.chat_template")), encoding="utf-8")
    mode = "16x" if "16x" in modes else "4x"  # the default; processor_config.json's image_processor wins
    pre = json.loads((tmp / "preprocessor_config.json").read_text())
    (tmp / "preprocessor_config.json").write_text(json.dumps({**pre, "downsample_mode": mode}, indent=2))
    processor = json.loads((tmp / "processor_config.json").read_text())
    processor["image_processor"] = {**processor.get("image_processor", {}), "downsample_mode": mode}
    (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first
        pass
    return target if (target / "config.json").exists() else tmp


def _prune(root: Path) -> None:
    """Drop prepared directories whose GGUF files are gone (they hold a tokenizer.json of ~10 MB each)."""
    import shutil

    for d in root.glob("*") if root.is_dir() else []:
        files = gguf_source(d)
        if files is not None and not (Path(files["model"]).exists() and Path(files["mmproj"]).exists()):
            shutil.rmtree(d, ignore_errors=True)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# --- reading the tensors ------------------------------------------------------------------------------------------


def _kernel_linear(name: str, cfg) -> bool:
    """Linears whose quantized weight the kernels take: the language model's and the head (not the vision tower's)."""
    return bool(re.fullmatch(rf"{LM}\.layers\.\d+\.(mlp|self_attn|linear_attn)\.\w*proj\w*\.weight", name)) or name in (
        "lm_head.weight", f"{LM}.embed_tokens.weight")


def read(source: Path, cfg, dense: bool, progress: bool | None = None) -> Loaded:
    from tqdm import tqdm

    files = gguf_source(source)
    if files is None:
        raise CheckpointError(f"{source}: not a GGUF checkpoint directory")
    lm, mm = File(Path(files["model"])), File(Path(files["mmproj"]))
    loaded = Loaded(format="gguf", tensors={}, types=Counter())
    names = [(lm, n) for n in lm.tensors] + [(mm, n) for n in mm.tensors]
    problems = [f"{f.path.name}: {n}" for f, n in names if our_name(n) is None]
    if problems:
        raise CheckpointError(f"GGUF tensors minicpmv does not know: {', '.join(problems[:10])}")
    for f, n in tqdm(names, desc="loading GGUF", unit="tensor", disable=None if progress is None else not progress):
        ours, kind = our_name(n), f.type_name(n)
        loaded.types[kind] += 1
        if not dense and kind in INT4 + INT8 and _kernel_linear(ours, cfg) and columns_permutation(ours, cfg) is None:
            t = f.tensors[n]
            cols, rows = int(t.shape[0]), int(t.shape[1]) if len(t.shape) > 1 else 1
            if kind in INT8:
                (q, s), o = int8_parts(t.raw, rows, cols), None
            else:
                q, s, o = int4_parts(kind, t.raw, rows, cols)
            perm = rows_permutation(ours, cfg)
            if perm is not None:
                q, s, o = q[perm], s[perm], None if o is None else o[perm]
            linear = ours.removesuffix(".weight")
            packed = quant.Grouped(torch.from_numpy(q), torch.from_numpy(s), None if o is None else torch.from_numpy(o),
                                   32, bits=8 if kind in INT8 else 4)
            if ours == f"{LM}.embed_tokens.weight":  # the tied head reads it packed; the lookup table stays dense
                if cfg.tie_word_embeddings:
                    loaded.quantized["lm_head"] = packed
                loaded.tensors[ours] = packed.dequantize().to(torch.bfloat16)
            else:
                loaded.quantized[linear] = packed
            continue
        loaded.tensors[ours] = torch.from_numpy(restore(ours, f.array(n), cfg))
        if kind not in DENSE:
            loaded.dequantized.append(f"{ours.removesuffix('.weight')} ({kind})")
    if "16x" not in files.get("downsample_modes", ["16x"]):
        # a 4x projector has no window merger: the model refuses 16x (model.downsample_modes), these stay unused
        with torch.device("meta"):
            from minicpmv.model.minicpmv import MiniCPMV

            shapes = {k: v.shape for k, v in MiniCPMV(cfg).state_dict().items() if ".vit_merger." in k}
        loaded.tensors.update({k: torch.zeros(s) for k, s in shapes.items()})
        loaded.notes.append("4x vision projector: 16x downsampling unavailable")
    loaded.notes.append(f"files: {Path(files['model']).name} + {Path(files['mmproj']).name}")
    if loaded.dequantized:
        log.warning("GGUF: %d quantized tensors have no matching kernel and were dequantized at load (%s)",
                    len(loaded.dequantized), ", ".join(sorted({d.rsplit(" ", 1)[1].strip("()") for d in loaded.dequantized})))
    return loaded
