"""Micro-benchmark of one decode step on the full-size random checkpoint: where a batch of B streams' time goes.

For each batch size: one DeltaNet layer and one attention layer of the fused step (``decode_step`` over that layer
alone, norms and mixer included) and the head, each timed alone; the step is estimated as 18 x DeltaNet + 6 x
attention + head. ``--full`` also times the whole fused step (noisy on a busy machine: every barrier waits for the
slowest thread), ``--parts`` each kind of matmul alone. Kernel builds given with ``--variant`` (compiler flags for
this tree's source, or ``git:REV`` for a revision's source: its packed layouts and structs must match this tree's)
are measured interleaved with the default one, best of ``--repeats``, so a noisy shared machine falls on every
variant alike. ``--cpu-time`` with OMP_NUM_THREADS=1 times by CPU time (robust to other processes). A
memory-bandwidth probe (the same threads) gives the roofline.

Usage: python bench/decode_step.py [--batch 1,16] [--repeats 5] [--isa avx2] [--quantization int8] [--full]
                                   [--variant main=git:main] [--variant r8=-DMAXR=8] [--cpu-time]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import demo_checkpoint  # noqa: E402


def build_variant(isa: str, spec: str, tag: str):
    """A build of the kernels: ``spec`` is compiler flags (comma-separated) for this tree's source, or ``git:REV``
    for the source at a git revision (flags after a comma)."""
    from minicpmv.model import kernels

    source, *flags = spec.split(",")
    command = kernels.compile_command(isa)[:-1]
    tmp = Path(tempfile.mkdtemp())
    if source.startswith("git:"):
        for f in (kernels.SOURCE, *kernels.HEADERS):
            rel = f.relative_to(Path(__file__).resolve().parent.parent)
            (tmp / f.name).write_bytes(subprocess.run(["git", "show", f"{source[4:]}:{rel}"], check=True,
                                                      capture_output=True).stdout)
        source_file = str(kernels.SOURCE)
        command = [f"-I{tmp}" if c.startswith("-I") else str(tmp / kernels.SOURCE.name) if c == source_file else c
                   for c in command]
    elif source:
        flags = [source, *flags]
    out = tmp / f"bench_{isa}_{tag}.so"
    subprocess.run([*command, *flags, "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    kernels._bind(lib)
    return lib


CLOCK = time.perf_counter


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--isa", help="MINICPMV_ISA for the default build")
    parser.add_argument("--quantization", choices=["int8", "int4"])
    parser.add_argument("--context", type=int, default=64, help="tokens already in each stream")
    parser.add_argument("--variant", action="append", default=[],
                        help="an extra build: name=-DFLAG,-DFLAG2 or name=git:REV (that revision's source)")
    parser.add_argument("--parts", action="store_true", help="time each kind of matmul alone too")
    parser.add_argument("--full", action="store_true", help="time the whole fused step too (noisy on a busy machine)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by this thread's CPU time (with OMP_NUM_THREADS=1: robust to other processes)")
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    if args.isa:
        os.environ["MINICPMV_ISA"] = args.isa
    from minicpmv.checkpoint import load_model
    from minicpmv.model import kernels
    from minicpmv.model.fast import set_threads

    threads = set_threads()
    model = load_model(demo_checkpoint(), dtype="bfloat16", quantization=args.quantization, progress=False)
    lm = model.model.language_model
    isa = kernels.active_isa()
    libs = {"default": kernels._lib}
    for spec in args.variant:
        name, flags = spec.split("=", 1)
        libs[name] = build_variant(isa, flags, name)
    print(f"isa {isa}, {threads} threads, quantization {args.quantization or 'bf16'}, variants {list(libs)}")

    probe = torch.empty(int(1e9) // 4, dtype=torch.float32).fill_(1.0)
    bw = probe.numel() * 4 / best(lambda: probe.sum(), 3) / 1e9
    del probe
    packed = {id(m): m for m in [*lm.modules(), model.lm_head] if isinstance(m, kernels.PackedLinear)}
    wbytes = sum(t.numel() * t.element_size() for m in packed.values() for t in (m.weight, m.scale) if t is not None)
    print(f"memory bandwidth {bw:.1f} GB/s; weights per step {wbytes / 1e9:.2f} GB: "
          f"roofline {bw * 1e9 / wbytes:.1f} steps/s")

    d = lm.cfg.hidden_size
    for B in [int(b) for b in args.batch.split(",")]:
        states = [model.new_state(args.context + 64) for _ in range(B)]
        g = torch.Generator().manual_seed(0)
        for s in states:  # a context of random keys / states
            for t in (*s.keys, *s.values):
                t[:, : args.context].normal_(generator=g)
            for t in s.recurrent:
                t.normal_(generator=g).mul_(0.05)
            s.length = args.context
        hidden0 = (torch.randn(B, d, generator=g) * 0.1).to(torch.bfloat16)

        def step(lib):
            kernels._lib = lib
            for s in states:
                s.length = args.context  # (the same position each time: the step overwrites its key)
            h = lm.fused_decode(lm, hidden0.clone(), states)
            model.lm_head(h)

        fd = lm.fused_decode
        first = {kind: next(i for i, L in enumerate(fd.layers) if L.kind == kind) for kind in (0, 1)}
        counts = {kind: sum(L.kind == kind for L in fd.layers) for kind in (0, 1)}

        def layer_call(lib, kind):
            """One layer of ``kind`` for the B streams (decode_step over that layer alone), as FastDecoder does."""
            l = first[kind]
            slot = lm.slot[l]
            ptrs = lambda ts: (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
            conv = ptrs([s.conv[min(slot, len(s.conv) - 1)] for s in states])
            rec = ptrs([s.recurrent[min(slot, len(s.recurrent) - 1)] for s in states])
            keys = ptrs([s.keys[min(slot, len(s.keys) - 1)] for s in states])
            values = ptrs([s.values[min(slot, len(s.values) - 1)] for s in states])
            cap = (ctypes.c_int64 * B)(*[s.keys[0].shape[1] for s in states])
            pos = (ctypes.c_int64 * B)(*[args.context] * B)
            cos, sin = (t.contiguous() for t in lm.rotary.cos_sin(torch.tensor([args.context] * B), torch.bfloat16))
            w = fd.widths
            bufs = [torch.empty(B, width, dtype=dtype) for width, dtype in (
                (d, torch.bfloat16), (w["proj"], torch.bfloat16), (w["core"], torch.bfloat16), (d, torch.bfloat16),
                (w["gu"], torch.bfloat16), (w["scratch"], torch.float32), (w["gsum"], torch.float32))]
            hidden = hidden0.clone()
            layer = ctypes.byref(fd.layers, l * ctypes.sizeof(kernels.LayerDesc))
            args_ = (1, layer, B, d, hidden.data_ptr(), lm.norm.weight.data_ptr(), lm.norm.eps, conv, rec, keys, values,
                     cap, pos, cos.data_ptr(), sin.data_ptr(), cos.shape[-1], *[b.data_ptr() for b in bufs],
                     0, None, None)  # no LoRA adapters (a build from before them ignores the extra arguments)
            keep = (bufs, cos, sin, hidden)  # alive while the call is
            return lambda: keep and lib.decode_step(*args_)

        xh = (torch.randn(B, d, generator=g) * 0.1).to(torch.bfloat16)
        calls = {name: {"deltanet": layer_call(lib, 0), "attention": layer_call(lib, 1)} for name, lib in libs.items()}
        rows = {name: {"deltanet": 1e9, "attention": 1e9, "head": 1e9} for name in libs}
        for _ in range(args.repeats):  # interleaved
            for name, lib in libs.items():
                r = rows[name]
                r["deltanet"] = min(r["deltanet"], best(calls[name]["deltanet"], 1))
                r["attention"] = min(r["attention"], best(calls[name]["attention"], 1))
                model.lm_head._kernel = lib.mm
                r["head"] = min(r["head"], best(lambda: model.lm_head(xh), 1))
        model.lm_head._kernel = libs["default"].mm
        total = lambda r: counts[0] * r["deltanet"] + counts[1] * r["attention"] + r["head"]  # noqa: E731
        base = total(rows["default"])
        for name, r in rows.items():
            t = total(r)
            print(f"B={B:2d} {name:>10}: DeltaNet layer {1e3 * r['deltanet']:6.2f} ms, attention layer "
                  f"{1e3 * r['attention']:6.2f} ms, head {1e3 * r['head']:6.2f} ms: step {1e3 * t:6.1f} ms, "
                  f"{B / t:6.1f} tok/s ({base / t:.2f}x default)")
        if args.full:
            full = {name: 1e9 for name in libs}

            def step(lib):
                kernels._lib, model.lm_head._kernel = lib, lib.mm
                for s in states:
                    s.length = args.context  # (the same position each time: the step overwrites its key)
                h = lm.fused_decode(lm, hidden0.clone(), states)
                model.lm_head(h)

            for _ in range(args.repeats):
                for name, lib in libs.items():
                    full[name] = min(full[name], best(lambda: step(lib), 1))
            kernels._lib, model.lm_head._kernel = libs["default"], libs["default"].mm
            for name, t in full.items():
                print(f"B={B:2d} {name:>10}: whole step + head {1e3 * t:6.1f} ms, {B / t:6.1f} tok/s "
                      f"({full['default'] / t:.2f}x default)")
        if args.parts:
            kinds = ("proj", "out", "gate_up", "down")
            layers = list(lm.fused_decode.layers)
            widths = {getattr(layer, kind).k for layer in layers for kind in kinds}
            xs = {k: (torch.randn(B, k) * 0.1).to(torch.bfloat16) for k in widths}
            outs = torch.empty(B, 8224, dtype=torch.bfloat16)
            xh = (torch.randn(B, d) * 0.1).to(torch.bfloat16)
            for name, lib in libs.items():
                kernels._lib = lib
                parts = {}
                for kind in kinds:
                    descs = [getattr(layer, kind) for layer in lm.fused_decode.layers]

                    def mms(descs=descs):
                        for desc in descs:
                            x = xs[desc.k]
                            lib.mm(ctypes.byref(desc), x.data_ptr(), B, desc.k, outs.data_ptr(), outs.shape[1], 0)

                    parts[kind] = best(mms, args.repeats)
                model.lm_head._kernel = lib.mm
                t_head = best(lambda: model.lm_head(xh), args.repeats)
                t_all = total(rows[name])
                flops = {kind: 2 * B * 64 * sum(getattr(lr, kind).k * getattr(lr, kind).nblocks for lr in layers)
                         for kind in kinds}
                head_flops = 2 * B * model.lm_head.desc.k * model.lm_head.desc.nblocks * 64
                rest = t_all - sum(parts.values()) - t_head
                cells = [f"{k} {1e3 * t:5.1f} ms ({flops[k] / t / 1e9:4.0f} GF/s)" for k, t in parts.items()]
                print(f"B={B:2d} {name:>10}: " + ", ".join(cells) + f", head {1e3 * t_head:5.1f} ms "
                      f"({head_flops / t_head / 1e9:4.0f} GF/s), rest {1e3 * rest:5.1f} ms")
            kernels._lib, model.lm_head._kernel = libs["default"], libs["default"].mm


if __name__ == "__main__":
    main()
