"""CPU benchmark on the full-size random-weight checkpoint: ours (bf16, int8, int4) beside transformers (bf16).

One process, engines one after another: a memory-bandwidth probe, then for each engine single-stream decode
tokens/s, prefill of 512 text tokens, time to first token for a 448x448 and a 1344x1344 image (9 slices), and peak
memory. Ours are printed as ratios to transformers bf16, and every decode rate as a
fraction of its roofline: measured bandwidth / weight bytes read per token. Inputs come from our processor for
both. With LLAMA_CPP_DIR pointing to a llama.cpp checkout with a build, its figures for the same weights converted
to GGUF (BF16, Q8_0, Q4_0) are added (its time to first token: the image encode time it logs, a lower bound).

Engines stay loaded after their turn (about 12 GB together): decode is measured again in rounds over all of them, so
a slow spell of this shared machine does not fall on one engine only. Peak memory is reported per engine, as a
process holding only that engine would see it.

With ``--isa avx512bf16,avx2`` (or ``all``: every kernel variant this CPU runs) each variant is measured in a
process of its own (``MINICPMV_ISA``): ours bf16 / int8 / int4 with a 16-stream aggregate decode rate, beside
transformers and our float32 fallback (``MINICPMV_ISA=none``). The AVX2 rows run as on an AVX2 machine: PyTorch,
oneDNN and MKL are held to AVX2 too (``AVX2_TORCH``), and transformers runs in float32 (its bf16 matmuls have no
hardware support there: what its users get).

Each child process prints the kernel variant it actually runs (its ``kernels:`` line). ``--quick`` is the short
run (16 decode tokens, best of 1, one round, no 1344x1344 image).

Usage: python bench/cpu.py [--decode-tokens 64] [--repeats 2] [--rounds 3]
                           [--engines ours-bf16,ours-int8,ours-int4,transformers] [--isa all] [--streams 16] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE, demo_checkpoint, image, proc_status, table, user  # noqa: E402

PREFILL_TOKENS = 512
IMAGES = (("TTFT 448 s", 448, 1), ("TTFT 1344 s", 1344, 2))


def images(args) -> tuple:
    """The time-to-first-token images measured: --quick keeps the 448x448 one."""
    return IMAGES[:1] if getattr(args, "quick", False) else IMAGES



# -- memory ---------------------------------------------------------------------------------------------------------
def bandwidth_probe(gigabytes: float = 2.0, repeats: int = 5) -> float:
    """Best of ``repeats`` full reads (a sum over all cores) of a float32 tensor, in GB/s. The tensor sits in
    huge-page memory where the OS allows it, like our packed weights, so the probe is not handicapped."""
    from minicpmv.model.kernels import huge_empty

    t = huge_empty((int(gigabytes * 1e9) // 4,), torch.float32).fill_(1.0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - start)
    return t.numel() * 4 / best / 1e9


class PeakRSS:
    """The highest resident set size while the block runs, in GB, as a process holding only this engine would see
    it: ``baseline`` (the process before any engine) plus the growth over the RSS at entry (engines measured before
    stay loaded for the decode rounds). The kernel's high-water mark, reset on entry: a sampling thread would take
    the GIL and a core from the engine being timed."""

    def __init__(self, baseline: int):
        self.baseline = baseline

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.entry = proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = (self.baseline + proc_status("VmHWM") - self.entry) / 1e9


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# -- ours ----------------------------------------------------------------------------------------------------------
def quantized_checkpoint(source: Path, method: str) -> Path:
    """``source`` quantized once with ``save_quantized`` (so loading it repeats no work)."""
    from minicpmv.checkpoint import load_model
    from minicpmv.model.quant import save_quantized

    path = CACHE / f"full-random-{method}"
    config = path / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("quantization", {}).get("method") != method:
        print(f"writing a {method} checkpoint to {path} (once)", flush=True)
        save_quantized(load_model(source, dtype="bfloat16", quantization=method, progress=False), path)
        release_memory()
    return path


def weight_bytes(model) -> int:
    """Bytes of the language model's matrices and the head: what one decode step reads."""
    from minicpmv.model.kernels import PackedLinear

    seen, total = set(), 0
    for m in [*model.model.language_model.modules(), model.lm_head]:
        if isinstance(m, PackedLinear) and id(m) not in seen:
            seen.add(id(m))
            total += sum(t.numel() * t.element_size() for t in (m.weight, m.scale) if t is not None)
        elif isinstance(m, torch.nn.Linear) and m.weight.device.type != "meta":
            total += m.weight.numel() * m.weight.element_size()
    return total


def measure_ours(ckpt: Path, method: str | None, args, baseline: int, dtype: str = "bfloat16"
                 ) -> tuple[dict, Callable[[], float]]:
    """The figures, and a function that measures decode tok/s once more (the model stays loaded for it)."""
    from minicpmv import LLM, SamplingParams
    from minicpmv.engine.sequence import Sequence
    from minicpmv.llm import ChatOptions

    if method:
        ckpt = quantized_checkpoint(ckpt, method)
    out = {}
    with PeakRSS(baseline) as rss:
        start = time.perf_counter()
        llm = LLM(ckpt, dtype=dtype, device="cpu", progress=False)
        out["load s"] = time.perf_counter() - start
        out["weight GB/token"] = weight_bytes(llm.model) / 1e9
        engine = llm.engine
        greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731

        def run(seq) -> list[float]:
            """Time stamps of each generated token (the engine cleared of cached images and prefixes first)."""
            engine.vision_cache.clear()
            engine.prefix_cache.clear()
            stamps, start = [], time.perf_counter()
            engine.add(seq)
            while seq.finish_reason is None:
                before = len(seq.output_ids)
                engine.step()
                if len(seq.output_ids) > before:
                    stamps.append(time.perf_counter() - start)
            return stamps

        def prepared(messages, n):
            options = ChatOptions.build(dataclasses.asdict(llm.default_options), {"max_slice_nums": 9})
            return llm.prepare(messages, greedy(n), options)

        def decode() -> float:
            stamps = run(prepared(user("Write a short story about a cat."), args.decode_tokens + 1))
            return args.decode_tokens / (stamps[-1] - stamps[0])

        def streams(n: int) -> float:
            """Aggregate decode tok/s of n streams decoding together (from the step where all have started)."""
            engine.vision_cache.clear()
            engine.prefix_cache.clear()
            seqs = [prepared(user(f"Write a short story about cat number {i}."), args.decode_tokens + 1) for i in range(n)]
            for seq in seqs:
                engine.add(seq)
            while any(not seq.output_ids for seq in seqs):
                engine.step()
            start, before = time.perf_counter(), sum(len(seq.output_ids) for seq in seqs)
            while any(seq.finish_reason is None for seq in seqs):
                engine.step()
            return (sum(len(seq.output_ids) for seq in seqs) - before) / (time.perf_counter() - start)

        run(prepared(user("warm up"), 4))
        out["decode tok/s"] = max(decode() for _ in range(args.repeats))
        if args.streams > 1 and dtype == "bfloat16":
            out[f"{args.streams} streams tok/s"] = max(streams(args.streams) for _ in range(args.repeats))
        ids = torch.randint(0, 150000, (PREFILL_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
        out["prefill 512 s"] = min(run(Sequence(list(ids), greedy(1), []))[0] for _ in range(args.repeats))
        for name, size, seed in images(args):
            seqs = [prepared(user("Describe the image.", image(size, size, seed)), 1) for _ in range(args.repeats)]
            out[name] = min(run(seq)[0] for seq in seqs)
    out["peak RSS GB"] = rss.peak
    return out, decode


# -- transformers --------------------------------------------------------------------------------------------------
def measure_transformers(ckpt: Path, args, baseline: int, dtype: torch.dtype = torch.bfloat16
                         ) -> tuple[dict, Callable[[], float]]:
    from transformers import MiniCPMV4_6ForConditionalGeneration

    from minicpmv.processing.prompt import Processor

    processor = Processor.from_dir(ckpt)
    out = {}
    with PeakRSS(baseline) as rss:
        start = time.perf_counter()
        model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).eval()
        out["load s"] = time.perf_counter() - start
        lm = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ("language_model" in n or n == "lm_head")]
        out["weight GB/token"] = sum(m.weight.numel() * m.weight.element_size() for m in lm) / 1e9

        def inputs(messages, **kw):
            p = processor(messages, max_slice_nums=9, **kw)
            batch = {"input_ids": p.input_ids[None]}
            if p.images:
                patches = torch.cat([i.pixel_values for i in p.images])
                n = patches.shape[0]  # ours [L, 3*14*14] -> the reference's NaViT packing [1, 3, 14, L*14]
                batch["pixel_values"] = patches.view(n, 3, 14, 14).permute(1, 2, 0, 3).reshape(1, 3, 14, n * 14)
                batch["target_sizes"] = torch.cat([i.target_sizes for i in p.images])
            return batch

        def seconds(batch, n) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - start

        seconds(inputs(user("warm up")), 4)
        story = inputs(user("Write a short story about a cat."))
        first = min(seconds(story, 1) for _ in range(args.repeats))

        def decode() -> float:  # generate's time for n + 1 tokens less its time for the first
            return args.decode_tokens / (seconds(story, args.decode_tokens + 1) - first)

        out["decode tok/s"] = max(decode() for _ in range(args.repeats))
        ids = torch.randint(0, 150000, (PREFILL_TOKENS,), generator=torch.Generator().manual_seed(0))
        out["prefill 512 s"] = min(seconds({"input_ids": ids[None]}, 1) for _ in range(args.repeats))
        for name, size, seed in images(args):
            batch = inputs(user("Describe the image.", image(size, size, seed)))
            out[name] = min(seconds(batch, 1) for _ in range(1 if size > 448 else args.repeats))
    out["peak RSS GB"] = rss.peak
    return out, decode


# -- llama.cpp -----------------------------------------------------------------------------------------------------
def measure_llama_cpp(ckpt: Path, root: Path, threads: int) -> dict[str, tuple[dict, Callable[[], float]]]:
    """llama-bench decode / prefill for BF16, Q8_0 and Q4_0 GGUFs of the same weights, and the image encode time
    that llama-mtmd-cli logs (a lower bound on its time to first token; its wall time includes loading the model).
    Best effort: a step that fails is reported and skipped."""
    binaries = next((p for p in (root / "build" / "bin", root / "bin", root) if (p / "llama-bench").exists()), None)
    if binaries is None:
        print(f"LLAMA_CPP_DIR={root}: no llama-bench found under build/bin, bin or the directory itself")
        return {}
    work = CACHE / "llama-cpp"
    work.mkdir(parents=True, exist_ok=True)
    bf16, mmproj = work / "model-bf16.gguf", work / "mmproj-bf16.gguf"
    convert = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "bf16"]
    try:
        if not bf16.exists():
            # --no-mtp: the checkpoint has no multi-token-prediction weights although its config counts one layer
            subprocess.run([*convert, "--no-mtp", "--outfile", str(bf16)], check=True, capture_output=True, text=True)
        if not mmproj.exists():
            subprocess.run([*convert, "--mmproj", "--outfile", str(mmproj)], capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        print(f"llama.cpp: converting to GGUF failed: {exc.stderr.strip()[-500:]}")
        return {}

    def bench(gguf: Path, *flags: str) -> list[dict]:
        run = subprocess.run([str(binaries / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-o", "json", *flags],
                             check=True, capture_output=True, text=True)
        return json.loads(run.stdout)

    results = {}
    for name in ("BF16", "Q8_0", "Q4_0"):
        gguf = bf16 if name == "BF16" else work / f"model-{name.lower()}.gguf"
        row = {}
        try:
            if not gguf.exists():
                subprocess.run([str(binaries / "llama-quantize"), str(bf16), str(gguf), name], check=True,
                               capture_output=True, text=True)
            for r in bench(gguf, "-p", str(PREFILL_TOKENS), "-n", "64"):
                if r.get("n_gen"):
                    row["decode tok/s"] = r["avg_ts"]
                elif r.get("n_prompt"):
                    row["prefill 512 s"] = PREFILL_TOKENS / r["avg_ts"]
            row["weight GB/token"] = gguf.stat().st_size / 1e9  # the file is nearly all weights
        except (subprocess.CalledProcessError, ValueError, OSError) as exc:
            print(f"llama.cpp {name}: {getattr(exc, 'stderr', '') or exc}".strip()[-500:])
            continue
        cli = binaries / "llama-mtmd-cli"
        if mmproj.exists() and cli.exists():
            for key, size, seed in IMAGES:
                from PIL import Image

                path = work / f"image-{size}.png"
                Image.fromarray(image(size, size, seed)).save(path)
                run = subprocess.run([str(cli), "-m", str(gguf), "--mmproj", str(mmproj), "--image", str(path), "-p",
                                      "Describe the image.", "-n", "1", "-t", str(threads)], capture_output=True, text=True)
                encoded = re.findall(r"encoding done in (\d+) ms", run.stdout + run.stderr)
                if run.returncode == 0 and encoded:
                    row[key] = sum(int(ms) for ms in encoded) / 1000

        def decode(gguf=gguf) -> float:
            return bench(gguf, "-p", "0", "-n", "64", "-r", "1")[0]["avg_ts"]

        results[f"llama.cpp {name}"] = (row, decode)
    return results


# -- report --------------------------------------------------------------------------------------------------------
METRICS = ["decode tok/s", "roofline %", "prefill 512 s", "TTFT 448 s", "TTFT 1344 s", "peak RSS GB", "load s"]
STREAMS = "16 streams tok/s"


def report(results: dict[str, dict], bandwidth: float, peer_name: str = "transformers bf16") -> None:
    for r in results.values():
        if "decode tok/s" in r and "weight GB/token" in r:
            r["roofline %"] = 100 * r["decode tok/s"] * r["weight GB/token"] / bandwidth
        if STREAMS in r and "decode tok/s" in r:
            r["streams / one"] = r[STREAMS] / r["decode tok/s"]
    metrics = [*METRICS[:2], *([STREAMS, "streams / one"] if any(STREAMS in r for r in results.values()) else []),
               *METRICS[2:]]
    rows = [[name, *(r.get(k, "-") for k in ["weight GB/token", *metrics])] for name, r in results.items()]
    print(table(rows, ["engine", "weights GB/tok", *metrics]))
    peer = results.get(peer_name)
    if not peer:
        return
    print(f"\nspeed-up over {peer_name} (higher is better)")
    keys = ["decode tok/s", "prefill 512 s", "TTFT 448 s", "TTFT 1344 s"]
    rows = []
    for name, r in results.items():
        if name == peer_name:
            continue
        cells = []
        for k in keys:
            if k in r and k in peer:
                cells.append(f"{r[k] / peer[k] if 'tok/s' in k else peer[k] / r[k]:.2f}x")
            else:
                cells.append("-")
        rows.append([name, *cells])
    print(table(rows, ["engine", "decode", "prefill 512", "TTFT 448", "TTFT 1344"]))


# -- one process per kernel variant ------------------------------------------------------------------------------
# PyTorch as on an AVX2-only CPU: its own kernels, oneDNN's, and MKL's float32 GEMM (which ignores the other two:
# AVX-512 otherwise, 1.4x the AVX2 rate on the vision tower's MLP shape)
AVX2_TORCH = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def variant_groups(isas: list[str]) -> list[tuple[str, str, dict, str]]:
    """(group, child's --engines, environment, peer name) per process: each variant's engines with its peer, then
    the float32 fallback under the same PyTorch limits."""
    groups = []
    for isa in isas:
        torch_env = AVX2_TORCH if isa == "avx2" else {}
        peer = "transformers fp32" if isa == "avx2" else "transformers bf16"
        groups.append((isa, f"ours-bf16,ours-int8,ours-int4,{peer.replace(' ', '-')}", {"MINICPMV_ISA": isa, **torch_env}, peer))
        groups.append((isa, "ours-fp32", {"MINICPMV_ISA": "none", **torch_env}, peer))
    return groups


def run_variants(args) -> None:
    from minicpmv.model import fast, kernels

    supported = [name for name, isa in kernels.ISAS.items() if isa.supported()]
    isas = supported if args.isa == "all" else args.isa.split(",")
    for isa in isas:
        if isa not in supported:
            raise SystemExit(f"--isa {isa}: this CPU cannot run it (supported: {', '.join(supported)})")
    threads = fast.set_threads()
    bandwidth = bandwidth_probe()
    print(f"memory bandwidth (best of 5 reads of 2 GB, {threads} threads): {bandwidth:.1f} GB/s", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for group, engines, env, _ in variant_groups(isas):
        command = [sys.executable, __file__, "--engines", engines, "--decode-tokens", str(args.decode_tokens),
                   "--repeats", str(args.repeats), "--rounds", str(args.rounds), "--streams", str(args.streams), "--json",
                   *(["--quick"] if args.quick else [])]
        print(f"[{group}] {' '.join(f'{k}={v}' for k, v in env.items())} {engines}", flush=True)
        # The child reports its figures after every engine: what it measured counts even if it fails later.
        child = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
        last = None
        for line in child.stdout:
            if line.startswith("RESULT "):
                last = line
            elif line.startswith("{") or line.startswith("decode round") or "kernels:" in line:  # (the variant run)
                print(f"[{group}] {line.rstrip()}", flush=True)
        child.wait()
        if child.returncode or last is None:
            print(f"[{group}] exited with {child.returncode}", flush=True)
        for name, r in (json.loads(last.removeprefix("RESULT ")) if last else {}).items():
            label = f"{name} ({group})" if name.startswith("ours") and name != "ours fp32" else name
            results.setdefault(group, {})[label] = r
        if "ours fp32" in results.get(group, {}):  # the group's last process: its table
            group_report(group, results[group], bandwidth)


def group_report(group: str, rows: dict[str, dict], bandwidth: float) -> None:
    peer = next(p for g, _, _, p in variant_groups([group]) if g == group)
    print(f"\n== {group}: kernels {group}; transformers and our float32 fallback with PyTorch "
          f"{'held to AVX2' if group == 'avx2' else 'as installed'}")
    report(rows, bandwidth, peer)
    fallback, bf16 = rows.get("ours fp32", {}), rows.get(f"ours bf16 ({group})", {})
    for key in ("TTFT 448 s", "TTFT 1344 s", "prefill 512 s", "decode tok/s"):
        if key in fallback and key in bf16:
            ratio = bf16[key] / fallback[key] if "tok/s" in key else fallback[key] / bf16[key]
            print(f"  ours bf16 ({group}) vs our float32 fallback, {key}: {ratio:.2f}x")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="take the best of this many runs of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="decode rounds over all engines after the first pass")
    parser.add_argument("--engines", default="ours-bf16,ours-int8,ours-int4,transformers")
    parser.add_argument("--isa", help="kernel variants to measure, each in a process of its own: a list or 'all'")
    parser.add_argument("--streams", type=int, default=16, help="streams decoding together for the aggregate rate")
    parser.add_argument("--json", action="store_true", help="(internal) end with a RESULT line of JSON")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (~10 min for --isa avx512bf16,avx2): 16 decode tokens, best of 1, one decode "
                             "round, no 1344x1344 image (explicit --decode-tokens / --repeats / --rounds still apply)")
    args = parser.parse_args()
    if args.quick:
        given = " ".join(sys.argv)
        args.decode_tokens = args.decode_tokens if "--decode-tokens" in given else 16
        args.repeats = args.repeats if "--repeats" in given else 1
        args.rounds = args.rounds if "--rounds" in given else 1
    if args.isa:
        return run_variants(args)
    from minicpmv.model import fast, kernels

    threads = fast.set_threads()
    ckpt = demo_checkpoint()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {threads} threads, torch {torch.__version__}, kernels: "
          f"{kernels.active_isa() or 'unavailable (plain PyTorch)'}; checkpoint {ckpt}")
    bandwidth = bandwidth_probe()
    print(f"memory bandwidth (best of 5 reads of 2 GB, {threads} threads): {bandwidth:.1f} GB/s", flush=True)
    baseline = proc_status("VmRSS")
    engines = {}  # name -> (figures, one more decode measurement)
    for engine in args.engines.split(","):
        print(f"measuring {engine} ...", flush=True)
        if engine.startswith("ours-"):
            method = engine.removeprefix("ours-")
            if method == "fp32":
                engines["ours fp32"] = measure_ours(ckpt, None, args, baseline, dtype="float32")
            else:
                engines[f"ours {method}"] = measure_ours(ckpt, None if method == "bf16" else method, args, baseline)
        elif engine in ("transformers", "transformers-bf16"):
            engines["transformers bf16"] = measure_transformers(ckpt, args, baseline)
        elif engine == "transformers-fp32":
            engines["transformers fp32"] = measure_transformers(ckpt, args, baseline, torch.float32)
        else:
            raise SystemExit(f"unknown engine {engine!r}")
        print(json.dumps({"engine": list(engines)[-1], **{k: round(v, 3) for k, v in engines[list(engines)[-1]][0].items()}}),
              flush=True)
        if args.json:
            print("RESULT " + json.dumps({name: figures for name, (figures, _) in engines.items()}), flush=True)
    if os.environ.get("LLAMA_CPP_DIR") and os.environ.get("MINICPMV_ISA") != "none":
        engines.update(measure_llama_cpp(ckpt, Path(os.environ["LLAMA_CPP_DIR"]), threads))
    # The machine's speed drifts over minutes (other tenants): decode is measured again in rounds that visit every
    # engine in turn, and each keeps its best, so no engine is judged only in a slow spell.
    for i in range(args.rounds):
        print(f"decode round {i + 1} of {args.rounds}:", end="", flush=True)
        for name, (figures, decode) in engines.items():
            rate = decode()
            figures["decode tok/s"] = max(figures.get("decode tok/s", 0.0), rate)
            print(f" {name} {rate:.1f}", end=",", flush=True)
        print()
    print()
    figures = {name: figures for name, (figures, _) in engines.items()}
    if args.json:
        print("RESULT " + json.dumps(figures), flush=True)
    else:
        report(figures, bandwidth)


if __name__ == "__main__":
    main()
