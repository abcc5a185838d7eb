"""Every instruction set's kernels on one set of cases: a C++ driver (tests/csrc/check_kernels.cpp) built per variant
runs them (NEON cross-compiled and run under qemu-aarch64), and each output is checked against PyTorch or against
the plain C++ build. Then the fast bf16 / int8 / int4 model on each variant this CPU runs, against the float32
reference."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minicpmv.checkpoint import load_model
from minicpmv.model import kernels
from minicpmv.model.kernels import ACTS, BLOCK, ISAS, QUANTS, PackedLinear, interleave_gate_up
from tests.tiny import REAL, SMALL, prompt_with_placeholders, reference_checkpoint, to_patches, tokens_per_unit

DRIVER = Path(__file__).with_name("csrc") / "check_kernels.cpp"
NATIVE = [name for name, isa in ISAS.items() if isa.supported()]
EMULATED = {"neon": ("aarch64-linux-gnu-g++", "qemu-aarch64")}  # cross compiler, emulator (scripts/install_test_deps.sh)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- the driver ------------------------------------------------------------------------------------------------------
def driver(isa: str) -> list[str]:
    """The command that runs ``isa``'s build of the driver ("generic": plain C++), built once per source version."""
    flags, runner, compiler = [], [], os.environ.get("CXX", "g++")
    if isa != "generic":
        flags = [*ISAS[isa].flags, f"-D{ISAS[isa].define}"]
    if isa in EMULATED and isa not in NATIVE:
        compiler, emulator = EMULATED[isa]
        missing = [tool for tool in (compiler, emulator) if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"{isa} kernels need {' and '.join(missing)} to be tested here (scripts/install_test_deps.sh)")
        flags, runner = [*flags, "-static"], [emulator]
    elif isa != "generic" and isa not in NATIVE:
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    command = [compiler, "-O2", "-std=c++17", "-fopenmp", *flags, f"-I{kernels.CSRC}", str(DRIVER), "-o"]
    source = b"".join(p.read_bytes() for p in (DRIVER, kernels.SOURCE, *kernels.HEADERS))
    key = hashlib.sha256(source + " ".join(command).encode()).hexdigest()[:16]
    binary = kernels._cache_dir() / f"check_kernels_{isa}_{key}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(f".tmp{os.getpid()}")
        build = subprocess.run([*command, str(tmp)], capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-3000:]
        os.replace(tmp, binary)
    return [*runner, str(binary)]


def raw(t: torch.Tensor | None) -> bytes:
    return b"" if t is None else t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


class Cases:
    """Kernel calls for the driver: each an op code, int64 / float64 fields and arrays; outputs come back in order."""

    def __init__(self):
        self.buf, self.outputs = io.BytesIO(), []  # per case: the dtypes of its outputs

    def add(self, op: int, ints: list[int], floats: list[float], arrays: list[torch.Tensor | None], outputs: list):
        self.buf.write(struct.pack(f"<{1 + len(ints)}q", op, *ints))
        self.buf.write(struct.pack(f"<{len(floats)}d", *floats))
        for a in arrays:
            data = raw(a)
            self.buf.write(struct.pack("<q", len(data)) + data)
        self.outputs.append(outputs)

    def run(self, isa: str, tmp: Path) -> list[list[torch.Tensor]]:
        (tmp / "in.bin").write_bytes(self.buf.getvalue())
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        result = subprocess.run([*driver(isa), str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split()[0] == isa  # the variant that ran
        data, pos, out = (tmp / "out.bin").read_bytes(), 0, []
        for dtypes in self.outputs:
            arrays = []
            for dtype in dtypes:
                (n,) = struct.unpack_from("<q", data, pos)
                arrays.append(torch.frombuffer(bytearray(data[pos + 8 : pos + 8 + n]), dtype=dtype))
                pos += 8 + n
            out.append(arrays)
        return out


def mm_case(cases: Cases, lin: PackedLinear, x: torch.Tensor, fp32: bool) -> None:
    xp = F.pad(x, (0, lin.k_pad - x.shape[1]))
    ints = [QUANTS.index(lin.quant), ACTS[lin.act], lin.weight.shape[0], lin.k_pad, lin.group, lin.out_features,
            x.shape[0], int(fp32)]
    if lin.offset is None:
        cases.add(1, ints, [], [lin.weight, lin.scale, lin.bias, xp], [torch.float32 if fp32 else torch.bfloat16])
    else:  # asymmetric int4 (zero points)
        cases.add(5, ints, [], [lin.weight, lin.scale, lin.bias, xp, lin.offset], [torch.float32 if fp32 else torch.bfloat16])


# AVX2 multiplies int8 and int4 weights by int16 activations (each rounded to 2^-15 of its group's largest): on
# random inputs a relative error of up to a few 1e-5 from that rounding alone.
I16_BOUND = 5e-5


def build_cases() -> tuple[Cases, list]:
    """The cases and, per case, a check(outputs, reference outputs of the plain C++ build)."""
    cases, checks = Cases(), []
    g = torch.Generator().manual_seed(0)
    for quant in QUANTS:
        for m, k, n in [(1, 64, 64), (3, 96, 200), (5, 130, 70), (16, 256, 192), (21, 64, 130), (32, 64, 130),
                        (70, 128, 100)]:
            w, bias = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
            act = "gelu_tanh" if (m, quant) == (3, "bf16") else None
            lin = PackedLinear(w, bias if quant == "bf16" else None, quant=quant, group=32, act=act)
            x = torch.randn(m, k, generator=g).bfloat16()
            expected = lin._reference(x.float(), torch.float32)
            for fp32, bound in ((True, 1e-5), (False, 4e-3)):  # float32 sums; one bf16 rounding of the output
                mm_case(cases, lin, x, fp32)
                checks.append(lambda out, ref, e=expected, b=bound: rel_err(out[0].view(e.shape), e) < b)
        gate, up = torch.randn(100, 128, generator=g) * 0.05, torch.randn(100, 128, generator=g) * 0.05
        lin = PackedLinear(interleave_gate_up(gate, up), quant=quant, act="silu_mul", out_features=100)
        x = torch.randn(4, 128, generator=g).bfloat16()
        expected = lin._reference(x.float(), torch.float32)
        mm_case(cases, lin, x, True)
        checks.append(lambda out, ref, e=expected: rel_err(out[0].view(e.shape), e) < 1e-5)
    # Integer weights and activations with power-of-two scales: every product and sum is exact in float32, so
    # each variant must give exactly the float64 result (the int8 / int4 decoding and the nibble offset included).
    for quant, (lo, hi) in (("bf16", (-64, 64)), ("int8", (-127, 128)), ("int4", (-8, 8))):
        # (40 rows x 1104 k: the wide tiles' several row passes and k chunks, AMX's row groups and k after its tiles;
        # 16 rows: a decode batch's row groups over a long k; int4 in whole groups)
        long_k = 1088 if quant == "int4" else 1104
        for m, k in ((1, 192), (4, 192), (9, 192), (16, long_k), (40, long_k)):
            n = 130
            q = torch.randint(lo, hi, (n, k), generator=g)
            scale = None
            if quant == "int8":
                scale = torch.full((n,), 2.0**-7)
            elif quant == "int4":
                scale = (2.0 ** torch.randint(-6, 0, (n, k // 64), generator=g)).bfloat16()
            lin = PackedLinear(q.to(torch.int8 if quant != "bf16" else torch.float32), quant=quant, group=64,
                               scale=scale)
            x = torch.randint(-8, 9, (m, k), generator=g).bfloat16()
            expected = (x.double() @ lin.dequantized(torch.float64).T).float()
            mm_case(cases, lin, x, True)
            checks.append(lambda out, ref, e=expected: torch.equal(out[0].view(e.shape), e))
    # Asymmetric int4 (w = scale q + offset per group: GPTQ / AWQ / GGUF zero points) for each group size, decode
    # and prefill row counts, silu_mul; exact on integers as above, close to float32 on random weights.
    for group in (32, 64, 128):
        for m in (1, 4, 9, 21, 40):
            n, k = 130, 256
            q = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
            scale = (2.0 ** torch.randint(-6, 0, (n, k // group), generator=g)).bfloat16()
            offsets = torch.randint(-16, 17, (n, k // group), generator=g) * 2.0**-5
            lin = PackedLinear(q, quant="int4", group=group, scale=scale, offsets=offsets)
            x = torch.randint(-8, 9, (m, k), generator=g).bfloat16()
            expected = (x.double() @ lin.dequantized(torch.float64).T).float()
            mm_case(cases, lin, x, True)
            checks.append(lambda out, ref, e=expected: torch.equal(out[0].view(e.shape), e))
        w = torch.randn(100, 192, generator=g) * 0.05
        q, s = kernels.quantize_int4(w, group)
        offsets = torch.randn(100, -(-192 // group), generator=g) * 0.01
        gate_up = PackedLinear(interleave_gate_up(q, q.flip(0)), quant="int4", group=group, act="silu_mul",
                               out_features=100, scale=interleave_gate_up(s, s.flip(0)),
                               offsets=interleave_gate_up(offsets, -offsets))
        for m in (1, 6):
            x = torch.randn(m, 192, generator=g).bfloat16()
            expected = gate_up._reference(x.float(), torch.float32)
            mm_case(cases, gate_up, x, True)
            checks.append(lambda out, ref, e=expected: rel_err(out[0].view(e.shape), e) < I16_BOUND)
    # int8 with a float32 scale per column and group (GGUF Q8_0): exact on integers, close on random weights.
    for group in kernels.INT8_GROUPS:
        for m in (1, 4, 9, 21, 40):
            n, k = 130, 256
            q = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
            scale = 2.0 ** torch.randint(-6, 0, (n, k // group), generator=g).float()
            lin = PackedLinear(q, quant="int8", group=group, scale=scale)
            x = torch.randint(-8, 9, (m, k), generator=g).bfloat16()
            expected = (x.double() @ lin.dequantized(torch.float64).T).float()
            mm_case(cases, lin, x, True)
            checks.append(lambda out, ref, e=expected: torch.equal(out[0].view(e.shape), e))
        q = torch.randint(-127, 128, (100, 192), generator=g).to(torch.int8)
        s = torch.rand(100, 192 // group, generator=g) * 1e-3
        gate_up = PackedLinear(interleave_gate_up(q, q.flip(0)), quant="int8", group=group, act="silu_mul",
                               out_features=100, scale=interleave_gate_up(s, s.flip(0)))
        for m in (1, 6):
            x = torch.randn(m, 192, generator=g).bfloat16()
            expected = gate_up._reference(x.float(), torch.float32)
            mm_case(cases, gate_up, x, True)
            checks.append(lambda out, ref, e=expected: rel_err(out[0].view(e.shape), e) < I16_BOUND)
    for m, d in ((1, 1024), (5, 72)):  # RMSNorm, zero-centred weights
        x, w = torch.randn(m, d, generator=g).bfloat16(), (torch.randn(d, generator=g) * 0.1).bfloat16()
        xf = x.float()
        expected = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())
        cases.add(2, [m, d], [1.0, 1e-6], [x, w], [torch.bfloat16])
        checks.append(lambda out, ref, e=expected: rel_err(out[0].view(e.shape), e) < 4e-3)
    for seqlens, d in (([64], 72), ([37, 100, 5], 72), ([1, 2, 70], 128)):  # block attention (vision tower)
        heads, n = 3, sum(seqlens)
        q, k, v = torch.randn(n, 3, heads, d, generator=g).bfloat16().unbind(1)
        parts, start = [], 0
        for length in seqlens:
            qs, ks, vs = (t[start : start + length].transpose(0, 1).float() for t in (q, k, v))
            parts.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1).reshape(length, -1))
            start += length
        expected = torch.cat(parts)
        cases.add(3, [len(seqlens), heads, d, *seqlens], [], [q, k, v], [torch.bfloat16])
        checks.append(lambda out, ref, e=expected: rel_err(out[0].view(e.shape), e) < 6e-3)
    # Gated DeltaNet from its projections to the gated norm: decode (one token each) and prefill chunks, from
    # non-zero states; checked against the plain C++ build (float32 throughout: only the summation order differs).
    for (hk, hv, dk, dv, kernel), lens in (((2, 4, 32, 32, 4), [1, 1, 1]), ((2, 4, 32, 32, 4), [5, 1, 9]),
                                            ((1, 2, 128, 128, 4), [1, 1])):  # (decode: whole 128-wide rows)
        conv_dim = 2 * hk * dk + hv * dv
        n, b = sum(lens), len(lens)
        arrays = [torch.randn(n, conv_dim, generator=g).bfloat16(), torch.randn(n, hv * dv, generator=g).bfloat16(),
                  torch.randn(n, hv, generator=g).bfloat16(), torch.randn(n, hv, generator=g).bfloat16(),
                  torch.randn(kernel, conv_dim, generator=g) * 0.3, (torch.rand(hv, generator=g) * 2).bfloat16(),
                  torch.randn(hv, generator=g).bfloat16(), (1 + torch.randn(dv, generator=g) * 0.1).bfloat16()]
        for _ in lens:
            arrays += [torch.randn(conv_dim, kernel - 1, generator=g).bfloat16(), torch.randn(hv, dk, dv, generator=g) * 0.1]
        cases.add(4, [b, *lens, hk, hv, dk, dv, kernel], [1e-6], arrays,
                  [torch.bfloat16] + [torch.bfloat16, torch.float32] * b)

        def same_as_plain(out, ref):
            return rel_err(out[0], ref[0]) < 4e-3 and all(rel_err(o, r) < 1e-5 for o, r in zip(out[1:], ref[1:]))

        checks.append(same_as_plain)
    lora_cases(cases, checks, g)
    return cases, checks


def lora_cases(cases: Cases, checks: list, g: torch.Generator) -> None:
    """The decode step's LoRA path (mm_lora): rows of two adapters (one with a part of its own ranks, as in a fused
    linear) and base rows, on each format, plain and silu_mul, with x A^T per thread (few rows) and shared (16
    rows of rank 64): adapter rows within bf16 rounding of PyTorch's x W^T + (x A^T) B^T (the adapters' effect is
    of the order of x W^T: a skipped one fails), base rows x W^T."""
    n = 130
    for rows, k, ranks in (([0, -1, 1, 0, -1, 1], 96, (4, 6)), ([i % 3 - 1 for i in range(16)], 1088, (64, 40))):
        m = len(rows)
        for quant in QUANTS:
            for act in (None, "silu_mul"):
                width = 2 * n if act else n
                w = torch.randn(width, k, generator=g) * 0.05
                lin = PackedLinear(interleave_gate_up(w[:n], w[n:]) if act else w, quant=quant, group=32, act=act,
                                   out_features=n)
                adapters, packed = [], []
                for r in ranks:
                    a = torch.randn(r, k, generator=g) * 2 / k**0.5
                    b = torch.randn(width, r, generator=g) * 0.4 / r**0.5
                    b[:70, : r // 2] = 0
                    adapters.append((a, b))
                    packed.append(kernels.pack_lora(lin, a, b))
                x = torch.randn(m, k, generator=g).bfloat16()
                pre = x.float() @ lin.dequantized(torch.float32).T  # the packed column order
                if act:  # -> [gate | up]
                    pre = pre.view(m, -1, 2, BLOCK // 2).transpose(1, 2).reshape(m, 2, -1)[:, :, :n].reshape(m, -1)
                plain = pre if act else pre[:, :n]
                for i, j in enumerate(rows):
                    if j >= 0:
                        plain[i] += (x[i].float() @ adapters[j][0].T) @ adapters[j][1].T
                expected = F.silu(plain[:, :n]) * plain[:, n:] if act else plain
                base = lin._reference(x.float(), torch.float32)
                arrays = [lin.weight, lin.scale, lin.bias, F.pad(x, (0, lin.k_pad - k)),
                          torch.tensor(rows, dtype=torch.int32)]
                for tensors in packed:
                    arrays += list(tensors)
                ints = [QUANTS.index(quant), ACTS[act], lin.weight.shape[0], lin.k_pad, lin.group, n, m, len(packed)]
                cases.add(6, ints, [], arrays, [torch.bfloat16])

                def check(out, ref, e=expected, b=base, rows=rows):
                    y = out[0].view(e.shape).float()
                    lora_rows = [i for i, j in enumerate(rows) if j >= 0]
                    base_rows = [i for i, j in enumerate(rows) if j < 0]
                    return rel_err(y[lora_rows], e[lora_rows]) < 6e-3 and rel_err(y[base_rows], b[base_rows]) < 4e-3

                checks.append(check)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    cases, checks = build_cases()
    return cases, checks, cases.run("generic", tmp_path_factory.mktemp("generic"))


@pytest.mark.parametrize("isa", ["generic", *ISAS])
def test_each_instruction_set_passes_the_kernel_cases(isa, shared, tmp_path):
    cases, checks, reference = shared
    got = reference if isa == "generic" else cases.run(isa, tmp_path)
    failed = [i for i, (check, out, ref) in enumerate(zip(checks, got, reference)) if not check(out, ref)]
    assert not failed, f"{isa}: cases {failed} of {len(checks)} fail"


# -- the model on each variant ---------------------------------------------------------------------------------------
def image_448() -> tuple[torch.Tensor, torch.Tensor]:
    """Patches and target sizes of a random 448x448 image, from the reference image processor."""
    from transformers import MiniCPMV4_6ImageProcessor

    pixels = np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)  # test_model's image
    out = MiniCPMV4_6ImageProcessor()(pixels, downsample_mode="16x", return_tensors="pt")
    return to_patches(out["pixel_values"]), out["target_sizes"]


@pytest.fixture
def variant(request, monkeypatch):
    """Make ``request.param``'s kernels the ones that modules created in the test use."""
    isa = request.param
    if isa not in NATIVE:
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    monkeypatch.setattr(kernels, "_lib", kernels.load_variant(isa))
    monkeypatch.setattr(kernels, "_isa", isa)
    monkeypatch.setattr(kernels, "_tried", True)
    return isa


STEPS = 16


@pytest.fixture(scope="module")
def float32_reference():
    """The float32 model's logits over an image prompt and its greedy tokens after a text prompt (the real
    vocabulary, as in test_model.test_bfloat16_stays_close_to_float32: a small one has near-ties below bf16's grain)."""
    _, directory = reference_checkpoint("base", REAL)
    fp32 = load_model(directory)
    patches, sizes = image_448()
    ids = prompt_with_placeholders(tokens_per_unit(sizes, "16x"), token=REAL.image, text=REAL.text)
    prompt = torch.randint(0, REAL.text, (40,), generator=torch.Generator().manual_seed(6))
    logits = fp32(ids, [fp32.new_state()], image_features=fp32.encode_images(patches, sizes), all_logits=True)
    return (patches, sizes, ids, prompt), logits, fp32.greedy(prompt, STEPS)


@pytest.mark.parametrize("variant", list(ISAS), indirect=True)
def test_bf16_model_agrees_with_float32_on_each_instruction_set(variant, float32_reference, capsys):
    (patches, sizes, ids, prompt), a, expected = float32_reference
    bf16 = load_model(reference_checkpoint("base", REAL)[1], dtype="bfloat16")
    assert kernels.active_isa() == variant and bf16.model.language_model.fused_decode is not None
    b = bf16(ids, [bf16.new_state()], image_features=bf16.encode_images(patches, sizes), all_logits=True)
    got = bf16.greedy(prompt, STEPS)
    same = next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y), STEPS)
    figures = {"max |dlogit|": round((a - b).abs().max().item(), 4),
               "min cosine": round(F.cosine_similarity(a, b, dim=-1).min().item(), 5),
               "argmax agreement": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4),
               f"greedy tokens equal (of {STEPS})": same}
    with capsys.disabled():
        print(f"\n{variant} bf16 vs float32 (image prompt logits, greedy decode): {json.dumps(figures)}")
    # The bounds of test_model.test_bfloat16_stays_close_to_float32 (AVX-512 BF16 measured 0.0103 / 0.9998 / 1.0).
    assert figures["max |dlogit|"] < 0.03 and figures["min cosine"] > 0.999 and figures["argmax agreement"] >= 0.98
    assert same >= STEPS // 2


@pytest.mark.parametrize("variant", ["avx2", "neon"], indirect=True)  # AVX-512 BF16: test_quant's 256-step test
def test_int8_and_int4_on_each_instruction_set_stay_close_to_bf16(variant, capsys):
    _, directory = reference_checkpoint("base")
    bf16 = load_model(directory, dtype="bfloat16")
    prompt = torch.randint(0, SMALL.text, (32,), generator=torch.Generator().manual_seed(0))
    tokens = bf16.greedy(prompt, 32)
    seq = torch.cat([prompt, torch.tensor(tokens[:-1])])
    reference = bf16(seq, [bf16.new_state()], all_logits=True)[len(prompt) - 1 :]
    report = {}
    for quant in ("int8", "int4"):
        model = load_model(directory, dtype="bfloat16", quantization=quant)
        assert all(m._kernel is not None for m in model.modules() if isinstance(m, PackedLinear))
        got = model(seq, [model.new_state()], all_logits=True)[len(prompt) - 1 :]
        report[quant] = {"top1": round((got.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4),
                         "cosine": round(F.cosine_similarity(got, reference, dim=-1).mean().item(), 5)}
    with capsys.disabled():
        print(f"\n{variant}: int8 / int4 agreement with bf16 over 32 greedy steps: {json.dumps(report)}")
    # test_quant's bounds (int8 top-1 >= 0.95, cosine >= 0.99; int4 cosine >= 0.9)
    assert report["int8"]["top1"] >= 0.95 and report["int8"]["cosine"] >= 0.99
    assert report["int4"]["cosine"] >= 0.9


@pytest.mark.parametrize("variant", list(ISAS), indirect=True)
def test_a_batch_of_streams_decodes_exactly_as_each_stream_alone(variant):
    """The batched decode step (row tiles of up to 16 streams, DeltaNet and attention across sequences) gives each
    stream the bits it gets alone: every row's sums run in the same order whatever the batch (AMX: int8 converted as
    it streams for one row group, a block at a time for 20 rows)."""
    _, directory = reference_checkpoint("untied_equal_heads")
    model = load_model(directory, dtype="bfloat16", quantization={"avx2": "int4", "amx": "int8"}.get(variant))
    ids = torch.randint(0, SMALL.text, (60,), generator=torch.Generator().manual_seed(3))
    states = [model.new_state() for _ in range(20 if variant == "amx" else 11)]
    for i, s in enumerate(states):
        model(ids[: 3 + 5 * i], [s])
    alone = [s.clone() for s in states]
    tokens = torch.randint(0, SMALL.text, (len(states),), generator=torch.Generator().manual_seed(4))
    batched = model(tokens, states, lengths=[1] * len(states))
    for i, s in enumerate(alone):
        assert torch.equal(batched[i], model(tokens[i : i + 1], [s])[0]), i


def test_minicpmv_isa_forces_a_variant_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.delenv("MINICPMV_NO_KERNELS", raising=False)
    monkeypatch.setenv("MINICPMV_ISA", "none")
    assert kernels.requested_isa() is None
    monkeypatch.setenv("MINICPMV_ISA", "avx3")
    with pytest.raises(ValueError, match="MINICPMV_ISA must be one of .*avx512bf16.*avx2.*neon.*none"):
        kernels.requested_isa()
    for name, isa in ISAS.items():
        monkeypatch.setenv("MINICPMV_ISA", name.upper())
        if isa.supported():
            assert kernels.requested_isa() == name
        else:
            with pytest.raises(ValueError, match="this CPU does not support it"):
                kernels.requested_isa()
    monkeypatch.delenv("MINICPMV_ISA")
    assert kernels.requested_isa() == (NATIVE[0] if NATIVE else None)  # the best this CPU has
