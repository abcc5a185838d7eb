"""Fast small-batch matmul on the CPU: weights packed once at load time, streamed linearly.

``PackedLinear`` replaces an ``nn.Linear`` (or several fused into one) in bf16, int8 (per-column scales) or int4
(group-wise scales). The C++ kernels (``csrc/kernels.cpp`` over the vector layer ``csrc/simd.h``) are compiled with
the system compiler at first use, for the best instruction set this CPU has (``ISAS``: AVX-512 BF16 with AMX-BF16
tiles, AVX-512 BF16, AVX2 + FMA + F16C, or ARM NEON; ``MINICPMV_ISA`` forces one, ``none`` or
``MINICPMV_NO_KERNELS`` none), and cached under ``~/.cache/minicpmv/kernels``. Every variant reads the same packed
layouts. When none can be built, every call falls back to ``F.linear`` on the unpacked (dequantized) weight, which
gives the same results, slowly for quantized ones.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import mmap
import os
import platform
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BLOCK = 64  # output columns per packed block (csrc/kernels.cpp)
CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "kernels.cpp"
HEADERS = [CSRC / "simd.h"]
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp"]
ACTS = {None: 0, "silu_mul": 1, "gelu_tanh": 2}
QUANTS = ("bf16", "int8", "int4")
INT8_GROUPS = (32, 64)  # int8 with a scale per column and group (GGUF Q8_0: 32); the AVX2 sums stay in int32
_OUT_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Isa:
    """A kernel variant: the /proc/cpuinfo flags it needs (x86) or the machine it runs on, and its compiler flags."""

    name: str
    cpu_flags: tuple[str, ...]
    machines: tuple[str, ...]
    flags: tuple[str, ...]
    define: str
    os_permission: Callable[[], bool] | None = None  # what Linux must grant besides the CPU's flags

    def supported(self) -> bool:
        if platform.machine().lower() not in self.machines:
            return False
        if self.cpu_flags:
            try:
                words = set(Path("/proc/cpuinfo").read_text().split())
            except OSError:
                return False
            if not all(f in words for f in self.cpu_flags):
                return False
        return self.os_permission is None or self.os_permission()


def _amx_permitted() -> bool:
    """Asks Linux for this process's AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA), as the kernels'
    build also does when loaded; False where it is refused (Linux before 5.16) or cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64
    except (OSError, AttributeError):
        return False


X86 = ("x86_64", "amd64")
AVX512BF16_CPU = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma")
AVX512BF16_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
ISAS = {  # best first
    "amx": Isa("amx", (*AVX512BF16_CPU, "amx_tile", "amx_bf16"), X86,
               (*AVX512BF16_FLAGS, "-mamx-tile", "-mamx-bf16", "-DMINICPMV_AMX"), "MINICPMV_AVX512BF16", _amx_permitted),
    "avx512bf16": Isa("avx512bf16", AVX512BF16_CPU, X86, AVX512BF16_FLAGS, "MINICPMV_AVX512BF16"),
    "avx2": Isa("avx2", ("avx2", "fma", "f16c"), X86, ("-mavx2", "-mfma", "-mf16c"), "MINICPMV_AVX2"),
    "neon": Isa("neon", (), ("aarch64", "arm64"), ("-march=armv8-a",), "MINICPMV_NEON"),  # NEON is part of AArch64
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_isa: str | None = None


def requested_isa() -> str | None:
    """The variant to use: ``MINICPMV_ISA`` if set (``none``: no kernels), else the best this CPU supports; None
    where there is none (or ``MINICPMV_NO_KERNELS`` is set). A forced variant the CPU lacks is an error."""
    if os.environ.get("MINICPMV_NO_KERNELS"):
        return None
    forced = os.environ.get("MINICPMV_ISA", "").strip().lower()
    if forced:
        if forced == "none":
            return None
        if forced not in ISAS:
            raise ValueError(f"MINICPMV_ISA must be one of {[*ISAS, 'none']}, got {forced!r}")
        if not ISAS[forced].supported():
            raise ValueError(f"MINICPMV_ISA={forced}: this CPU does not support it")
        return forced
    return next((name for name, isa in ISAS.items() if isa.supported()), None)


def cpu_supported() -> bool:
    """Whether this CPU has an instruction set the kernels are written for."""
    return any(isa.supported() for isa in ISAS.values())


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minicpmv" / "kernels"


# How far ahead, and into which cache, the tiles prefetch the weight stream, where a vendor's CPUs want other than
# the source's defaults (non-temporal, 8 KiB: measured best on AMD Zen 4). Intel (a Sapphire Rapids class Xeon,
# bench/decode_step.py --variant, one stream): into L2 2 KiB ahead, 2.5x the bf16 decode rate of the defaults
# (NTA prefetches there fill only L1, and lines fetched that far ahead are evicted before they are used).
STREAM_PREFETCH = {"GenuineIntel": ("-DSTREAM_HINT=_MM_HINT_T1", "-DPREFETCH=2048")}


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def compile_command(isa: str, compiler: str = "g++") -> list[str]:
    """The compiler's arguments for ``isa``'s build of the kernels (output path last, to be appended)."""
    tuning = STREAM_PREFETCH.get(_cpu_vendor(), ()) if ISAS[isa].machines == X86 else ()
    return [compiler, *FLAGS, *ISAS[isa].flags, f"-D{ISAS[isa].define}", *tuning, f"-I{CSRC}", str(SOURCE), "-o"]


def _build(isa: str) -> Path:
    compiler = os.environ.get("CXX", "g++")
    source = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    command = compile_command(isa, compiler)
    key = hashlib.sha256(source + " ".join(command).encode() + version.encode()).hexdigest()[:16]
    target = _cache_dir() / f"minicpmv_kernels_{isa}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([*command, str(out)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders each produce the same file
    return target


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mm.argtypes = [ptr, ptr, i64, i64, ptr, i64, i32]
    lib.rmsnorm_bf16.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_float, ctypes.c_float, ptr, i64]
    lib.deltanet_forward.argtypes = [i64, ptr, ptr] + [i64] * 5 + [ptr, i64] * 4 + [ptr] * 6 + [ctypes.c_float, ptr, ptr]
    lib.attention_blocks.argtypes = [i64, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, ptr]
    lib.decode_step.argtypes = ([i64, ptr, i64, i64, ptr, ptr, ctypes.c_float] + [ptr] * 8 + [i64] + [ptr] * 7
                                + [i64, ptr, ptr])
    lib.mm_lora.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, ptr, i64]
    lib.kernels_isa.restype = ctypes.c_char_p


def load_variant(isa: str) -> ctypes.CDLL:
    """``isa``'s build of the kernels, compiled if needed (tests compare variants through this)."""
    lib = ctypes.CDLL(str(_build(isa)))
    _bind(lib)
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) when they cannot be used here."""
    global _lib, _tried, _isa
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            isa = requested_isa()
        except ValueError as exc:
            log.warning("%s: using the plain PyTorch matmul", exc)
            isa = None
        if isa is None:
            if os.environ.get("MINICPMV_NO_KERNELS") or os.environ.get("MINICPMV_ISA", "").strip().lower() == "none":
                log.info("minicpmv CPU kernels disabled by the environment")
            elif not cpu_supported():
                log.warning("this CPU has none of the kernels' instruction sets (%s): using the plain PyTorch "
                            "matmul (slower)", ", ".join(ISAS))
        else:
            try:
                _lib, _isa = load_variant(isa), isa
                log.info("minicpmv CPU kernels: %s", isa)
            except Exception as exc:  # no compiler, a failed build: the fallback still works
                log.warning("could not build the minicpmv CPU kernels (%s): using the plain PyTorch matmul", exc)
        _tried = True
        return _lib


def active_isa() -> str | None:
    """The variant in use ("amx", "avx512bf16", "avx2", "neon"), or None (plain PyTorch)."""
    library()
    return _isa if _lib is not None else None


def available() -> bool:
    return library() is not None


class LinearDesc(ctypes.Structure):  # struct Linear in csrc/kernels.cpp
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("nblocks", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64), ("n_out", ctypes.c_int64),
                ("quant", ctypes.c_int32), ("act", ctypes.c_int32), ("offset", ctypes.c_void_p)]


class LayerDesc(ctypes.Structure):  # struct Layer in csrc/kernels.cpp
    _fields_ = [("kind", ctypes.c_int64), ("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("mixer_eps", ctypes.c_float),
                *((name, LinearDesc) for name in ("proj", "out", "gate_up", "down")),
                *((name, ctypes.c_int64) for name in ("hk", "hv", "dk", "dv", "kernel")),
                *((name, ctypes.c_void_p) for name in ("conv_wt", "a_log", "dt_bias", "norm_w")),
                *((name, ctypes.c_int64) for name in ("heads", "kv_heads", "head_dim")),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p)]



# -- packing --------------------------------------------------------------------------------------------------------
def huge_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor backed by transparent huge pages where the OS allows it: streaming weights then crosses
    no 4 KiB page boundaries (no TLB misses, no prefetcher restarts); ~10% more bandwidth measured."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < (4 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps ``buf`` alive


def _pad(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0]))


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows ordered so each 64-row block holds 32 gate rows then the matching 32 up rows (the silu_mul layout)."""
    half = BLOCK // 2
    n = -(-gate.shape[0] // half) * half
    gate, up = _pad(gate, n, gate.shape[1]), _pad(up, n, up.shape[1])
    return torch.stack([gate.view(-1, half, gate.shape[1]), up.view(-1, half, up.shape[1])], 1).reshape(2 * n, -1)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [N, K] int8, scale [N] float32) with w ~= q * scale."""
    wf = w.float()
    scale = wf.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int8_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in groups of ``group`` inputs (K a multiple of it): (q [N, K] int8, scale [N, K/group]
    float16, as GGUF Q8_0 stores them)."""
    n, k = w.shape
    wf = w.float().view(n, k // group, group)
    scale = (wf.abs().amax(-1) / 127).clamp(min=2.0**-24, max=65504).half()
    q = torch.round(wf / scale.float()[..., None]).clamp(-127, 127)
    return q.to(torch.int8).view(n, k), scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4: (q [N, K] int8 in [-8, 7], scale [N, ceil(K/group)] bfloat16); a last, partial
    group is quantized as if padded with zeros."""
    n, k = w.shape
    wf = _pad(w.float(), n, -(-k // group) * group).view(n, -1, group)
    scale = (wf.abs().amax(-1) / 7).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(wf / scale.float()[..., None]).clamp(-8, 7).to(torch.int8)
    return q.view(n, -1)[:, :k], scale


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Plain storage of int4 values [N, K] -> [N, ceil(K/2)] uint8, even k in the low nibble (the checkpoint
    format)."""
    u = (_pad(q, q.shape[0], q.shape[1] + q.shape[1] % 2) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4_rows(p: torch.Tensor, k: int) -> torch.Tensor:
    return (torch.stack([p & 15, p >> 4], -1).flatten(-2).to(torch.int8) - 8)[:, :k]


class PackedLinear(nn.Module):
    """y = x @ W^T (+ bias) over a packed weight; ``act="silu_mul"`` returns silu(gate) * up for a gate/up weight
    laid out by ``interleave_gate_up`` (output width = half its rows)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, quant: str = "bf16",
                 group: int = 64, act: str | None = None, out_features: int | None = None,
                 scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 parts: list[tuple[str, int]] | None = None, offsets: torch.Tensor | None = None,
                 in_perm: torch.Tensor | None = None):
        """``weight`` [N, K] in any float dtype (quantized here), or already-quantized int8 values [N, K] with
        ``scale`` ([N] for int8, [N, K/group] for int4, and for int8 in groups: GGUF Q8_0, ``group`` 32 or 64, kept in
        float16). ``parts`` names the (checkpoint name, rows) of the linears
        fused into this one, in order, for saving. ``offsets`` [N, K/group] (int4 with ``scale`` only) makes the
        weight asymmetric: w = scale * q + offset per group, q in -8..7 (the zero points of GPTQ, AWQ, GGUF).
        ``in_perm`` [K]: the weight's columns are the inputs in that order (GPTQ act-order); inputs are gathered in
        it before the matmul."""
        super().__init__()
        n, k = weight.shape
        self.quant, self.act, self.in_features, self.out_dtype = quant, act, k, out_dtype
        self.parts = parts or []
        self.out_features = out_features or (n // 2 if act == "silu_mul" else n)
        grouped_int8 = quant == "int8" and scale is not None and scale.dim() == 2
        self.group = group if quant == "int4" or grouped_int8 else 0
        if quant == "int4" and group % 4:
            raise ValueError(f"the int4 group size must be a multiple of 4, got {group}")
        if grouped_int8 and (group not in INT8_GROUPS or k % group):
            raise ValueError(f"int8 groups must be one of {INT8_GROUPS} inputs and divide K = {k}, got {group}")
        if quant not in QUANTS:
            raise ValueError(f"unknown weight format {quant!r}")
        if offsets is not None and (quant != "int4" or scale is None):
            raise ValueError("offsets need int4 values with their scales")
        nb = -(-n // BLOCK)
        k_pad = -(-k // group) * group if quant == "int4" else k + k % 2
        if quant == "int4":
            shape, dtype = (nb, k_pad // group, group // 4, 4, 16, 2), torch.uint8
            self.register_buffer("scale", huge_empty((nb, k_pad // group, BLOCK), torch.bfloat16))
            self.register_buffer("offset", None if offsets is None else torch.empty((nb, k_pad // group, BLOCK), dtype=torch.bfloat16))
        else:
            shape, dtype = (nb, k_pad // 2, BLOCK, 2), torch.int8 if quant == "int8" else torch.bfloat16
            scale_shape = (nb, k // group, BLOCK) if grouped_int8 else (nb * BLOCK,)
            scale_dtype = torch.float16 if grouped_int8 else torch.float32
            self.register_buffer("scale", huge_empty(scale_shape, scale_dtype) if quant == "int8" else None)
            self.register_buffer("offset", None)
        self.register_buffer("weight", huge_empty(shape, dtype))
        rows = 64 * BLOCK  # packed a slice of rows at a time: bounded temporary memory even for the 248k-row head
        for r in range(0, n, rows):
            self._pack_rows(r // BLOCK, weight[r : r + rows], None if scale is None else scale[r : r + rows], k_pad,
                            None if offsets is None else offsets[r : r + rows])
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("in_perm", None if in_perm is None else in_perm.long())
        self.n_rows, self.k_pad = n, k_pad
        self._refresh()

    def _pack_rows(self, block: int, w: torch.Tensor, scale: torch.Tensor | None, k_pad: int,
                   offsets: torch.Tensor | None = None) -> None:
        """Quantize (unless ``scale`` is given) and pack rows of the weight into the blocks from ``block`` on."""
        n, k = w.shape
        nb, group = -(-n // BLOCK), self.group
        if self.quant == "bf16":
            q = _pad(w.to(torch.bfloat16), nb * BLOCK, k_pad)
        elif self.quant == "int8":
            q, scale = (w, scale) if scale is not None else quantize_int8(w)
            q = _pad(q, nb * BLOCK, k_pad)
            if self.group:
                s = _pad(scale.half(), nb * BLOCK, k // group)
                self.scale[block : block + nb] = s.view(nb, BLOCK, -1).transpose(1, 2)
            else:
                self.scale[block * BLOCK : block * BLOCK + n] = scale
                self.scale[block * BLOCK + n : (block + nb) * BLOCK] = 0
        else:
            q, scale = (w, scale) if scale is not None else quantize_int4(w, group)
            u = (_pad(q, nb * BLOCK, k_pad) + 8).to(torch.uint8)
            # [nb, 64 cols, ng, 2 halves, g/4 rows, 2 k] -> [nb, ng, g/4 rows, 4 chunks, 16 cols, 2 k, 2 halves]
            u = u.view(nb, 4, 16, k_pad // group, 2, group // 4, 2).permute(0, 3, 5, 1, 2, 6, 4)
            self.weight[block : block + nb] = u[..., 0] | (u[..., 1] << 4)
            s = _pad(scale.to(torch.bfloat16), nb * BLOCK, k_pad // group)
            self.scale[block : block + nb] = s.view(nb, BLOCK, -1).transpose(1, 2)
            if offsets is not None:
                o = _pad(offsets.to(torch.bfloat16), nb * BLOCK, k_pad // group)
                self.offset[block : block + nb] = o.view(nb, BLOCK, -1).transpose(1, 2)
            return
        self.weight[block : block + nb] = q.view(nb, BLOCK, k_pad // 2, 2).transpose(1, 2)

    def _refresh(self) -> None:
        """The kernel's view of this weight (pointers: refreshed whenever the module's tensors are replaced)."""
        self.desc = LinearDesc(self.weight.data_ptr(), _ptr(self.scale), _ptr(self.bias), self.weight.shape[0],
                               self.k_pad, self.group, self.out_features, QUANTS.index(self.quant), ACTS[self.act],
                               _ptr(getattr(self, "offset", None)))
        self._kernel = None if library() is None else _lib.mm

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    # -- the weight back in [N, K] layout (fallback, large batches, saving) ------------------------------------------
    def quantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values [N, K], scale) in the plain layout: bf16 weights and no scale, or int8 values and their scale."""
        nb, k, n = self.weight.shape[0], self.in_features, self.n_rows
        if self.quant in ("bf16", "int8"):  # [nb, K/2, 64, 2]
            w = self.weight.transpose(1, 2).reshape(nb * BLOCK, -1)[:n, :k]
            if self.group:  # int8 groups: scales [nb, K/group, 64]
                return w, self.scale.transpose(1, 2).reshape(nb * BLOCK, -1)[:n]
            return w, None if self.scale is None else self.scale[:n]
        p = self.weight
        u = torch.stack([p & 15, p >> 4], -1)  # [nb, ng, g/4, 4, 16, 2, 2]
        q = u.permute(0, 3, 4, 1, 6, 2, 5).reshape(nb * BLOCK, -1).to(torch.int8) - 8
        s = self.scale.transpose(1, 2).reshape(nb * BLOCK, -1)
        return q[:n, :k], s[:n]

    def offsets(self) -> torch.Tensor | None:
        """An asymmetric int4 weight's offsets [N, K/group] in the plain layout (None when symmetric)."""
        if getattr(self, "offset", None) is None:
            return None
        return self.offset.transpose(1, 2).reshape(-1, self.offset.shape[1])[: self.n_rows]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its last dim in the weight's input order (itself unless ``in_perm``)."""
        return x if self.in_perm is None else x.index_select(-1, self.in_perm)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight, dequantized to float32 [len(ids), K] (embedding lookups from a tied head)."""
        if self.in_perm is not None:
            w = self._rows(ids)
            return torch.empty_like(w).index_copy_(1, self.in_perm, w)
        return self._rows(ids)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        b, c = ids // BLOCK, ids % BLOCK
        if self.quant in ("bf16", "int8"):
            w = self.weight[b, :, c].reshape(len(ids), -1)[:, : self.in_features].float()
            if self.group:
                return w * self.scale[b, :, c].repeat_interleave(self.group, 1)
            return w if self.scale is None else w * self.scale[ids, None]
        p = self.weight[b, :, :, c // 16, c % 16]  # [len, ng, g/4, 2 k] bytes
        u = torch.stack([p & 15, p >> 4], 2)  # [len, ng, 2 halves, g/4, 2 k]
        q = u.reshape(len(ids), -1, self.group).float() - 8
        w = q * self.scale[b, :, c].float()[..., None]
        if self.offset is not None:
            w = w + self.offset[b, :, c].float()[..., None]
        return w.reshape(len(ids), -1)[:, : self.in_features]

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        q, s = self.quantized()
        if self.quant == "bf16":
            return q.to(dtype)
        if self.quant == "int8":
            return (q.float() * (s.repeat_interleave(self.group, 1) if self.group else s[:, None])).to(dtype)
        n, k = q.shape
        q = _pad(q.float(), n, s.shape[1] * self.group).view(n, -1, self.group)
        w = q * s.float()[..., None]
        if self.offset is not None:
            w = w + self.offsets().float()[..., None]
        return w.view(n, -1)[:, :k].to(dtype)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out_dtype = out_dtype or self.out_dtype or x.dtype
        x = self.gather(x)
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if self._kernel is None or x.dtype != torch.bfloat16 or out_dtype not in _OUT_DTYPES:
            return self._reference(x2, out_dtype).view(*x.shape[:-1], -1)
        if x2.stride(-1) != 1 or k != self.k_pad:
            x2 = F.pad(x2, (0, self.k_pad - k)).contiguous()
        out = torch.empty(m, self.out_features, dtype=out_dtype)
        n = self.out_features
        self._kernel(ctypes.byref(self.desc), x2.data_ptr(), m, x2.stride(0), out.data_ptr(), n, out_dtype == torch.float32)
        return out.view(*x.shape[:-1], n)

    def _reference(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        w = self.dequantized(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, w, bias)
        if self.act == "silu_mul":
            y = y.view(-1, y.shape[-1] // BLOCK, 2, BLOCK // 2)
            y = (F.silu(y[:, :, 0]) * y[:, :, 1]).reshape(x.shape[0], -1)[:, : self.out_features]
        elif self.act == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, quant={self.quant}, act={self.act}"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# -- decode-step kernels (bf16 activations; callers check ``available()`` first) ------------------------------------
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, offset: float, eps: float) -> torch.Tensor:
    """rmsnorm(x) * (offset + weight) over the last dim, float32 maths, for bf16 x and weight."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.bfloat16)
    _lib.rmsnorm_bf16(x2.data_ptr(), x2.stride(0), x2.shape[0], x2.shape[1], weight.data_ptr(), offset, eps,
                      out.data_ptr(), out.stride(0))
    return out.view(x.shape)


def deltanet_forward(layer, mixed, z, b, a, lengths: list[int], conv: list[torch.Tensor], rec: list[torch.Tensor]):
    """The tokens of several sequences (``lengths``) through ``layer`` (a GatedDeltaNet) from its projections to
    the normed core [N, value_dim]; the conv and recurrent states are updated in place (each must be contiguous)."""
    n, count = mixed.shape[0], len(lengths)
    out = torch.empty(n, layer.value_dim, dtype=torch.bfloat16)
    taps = layer.kernel - 1
    scratch = torch.empty(n * (layer.conv_dim + layer.v_heads * (layer.dv + 3)) + count * taps * layer.conv_dim)
    starts = (ctypes.c_int64 * count)(*itertools.accumulate(lengths[:-1], initial=0))
    lens = (ctypes.c_int64 * count)(*lengths)
    conv_ptrs = (ctypes.c_void_p * count)(*[c.data_ptr() for c in conv])
    rec_ptrs = (ctypes.c_void_p * count)(*[r.data_ptr() for r in rec])
    args = []
    for t in (mixed, z, b, a):
        assert t.stride(-1) == 1 and t.dtype == torch.bfloat16
        args += [t.data_ptr(), t.stride(0)]
    _lib.deltanet_forward(count, starts, lens, layer.k_heads, layer.v_heads, layer.dk, layer.dv, layer.kernel, *args,
                          layer.conv_wt.data_ptr(), conv_ptrs, rec_ptrs, layer.A_log.data_ptr(),
                          layer.dt_bias.data_ptr(), layer.norm.weight.data_ptr(), layer.norm.eps, out.data_ptr(),
                          scratch.data_ptr())
    return out


def attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Bidirectional attention within each block of ``seqlens`` consecutive tokens. q, k, v: [L, heads, d] bf16
    views sharing one row stride (d even); returns [L, heads * d] bf16."""
    n, heads, d = q.shape
    assert q.stride() == k.stride() == v.stride() and q.stride(-1) == 1 and d % 2 == 0
    out = torch.empty(n, heads * d, dtype=torch.bfloat16)
    count = len(seqlens)
    starts = (ctypes.c_int64 * count)(*itertools.accumulate(seqlens[:-1], initial=0))
    lens = (ctypes.c_int64 * count)(*seqlens)
    _lib.attention_blocks(count, starts, lens, heads, d, q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0),
                          out.data_ptr())
    return out


# -- LoRA in the decode step (csrc/kernels.cpp: linear_lora) --------------------------------------------------
class LoraSiteDesc(ctypes.Structure):  # struct LoraSite in csrc/kernels.cpp: one adapter on one packed linear
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("span", ctypes.c_void_p), ("rank", ctypes.c_int64)]


def pack_lora(linear: PackedLinear, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An adapter's low-rank product on ``linear`` for the decode kernel: A [R, K] and B [width, R] (scale folded
    in; for silu_mul its rows in the plain [gate | up] order) -> (A [R, K_pad], B^T in the packed column order
    [nblocks, R, 64], span [nblocks, 2] int32: the ranks with non-zero columns in each block), float32."""
    r = a.shape[0]
    a = F.pad(a.float(), (0, linear.k_pad - a.shape[1])).contiguous()
    b = b.float()
    if linear.act == "silu_mul":
        half = b.shape[0] // 2
        b = interleave_gate_up(b[:half], b[half:])
    nb = linear.weight.shape[0]
    bt = _pad(b, nb * BLOCK, r).view(nb, BLOCK, r).transpose(1, 2).contiguous()
    used = (bt != 0).any(-1)  # [nb, R]
    ranks = torch.arange(r).expand(nb, r)
    lo = torch.where(used, ranks, r).amin(1)
    hi = torch.where(used, ranks + 1, 0).amax(1)
    span = torch.stack([lo.clamp(max=r), torch.maximum(hi, lo.clamp(max=r))], 1).to(torch.int32).contiguous()
    return a, bt, span


def lora_site(packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> LoraSiteDesc:
    """The kernel's view of ``pack_lora``'s tensors (they must outlive it); None: an empty site."""
    if packed is None:
        return LoraSiteDesc(None, None, None, 0)
    a, bt, span = packed
    return LoraSiteDesc(a.data_ptr(), bt.data_ptr(), span.data_ptr(), a.shape[0])


def mm_lora(linear: PackedLinear, x: torch.Tensor, adapters: list, rows: list[int]) -> torch.Tensor:
    """``linear(x)`` (bf16) plus, for each row i with rows[i] >= 0, adapter rows[i] (``pack_lora``'s tensors): the
    decode step's LoRA path on one linear (tests)."""
    x = F.pad(x, (0, linear.k_pad - x.shape[1])).contiguous()
    m = x.shape[0]
    sites = [(LoraSiteDesc * 1)(lora_site(p)) for p in adapters]
    table = (ctypes.c_void_p * max(1, len(sites)))(*[ctypes.addressof(s) for s in sites])
    out = torch.empty(m, linear.out_features, dtype=torch.bfloat16)
    _lib.mm_lora(ctypes.byref(linear.desc), len(sites), table, (ctypes.c_int32 * m)(*rows), x.data_ptr(), m,
                 x.stride(0), out.data_ptr(), linear.out_features)
    return out

