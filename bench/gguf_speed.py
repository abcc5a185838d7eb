"""Decode speed of a llama.cpp Q8_0 GGUF against our own int8, same weights, same run.

The random-weight checkpoint (bench/common.py) is converted once with llama.cpp's own converter
(scripts/fetch_llama_cpp.sh --converter-only: convert_hf_to_gguf.py --no-mtp --outtype q8_0, plus its mmproj in
f16) and loaded through minicpmv.model.formats.gguf; ours is ``quantization="int8"`` on the bf16 checkpoint. One
stream, greedy, in interleaved rounds with a fresh process per model and round (the best of each). Target: Q8_0
within 10% of ours.

Usage: python bench/gguf_speed.py [--size full|tiny] [--decode-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import CACHE, demo_checkpoint, interleaved_decode_rates, table  # noqa: E402


def convert(source: Path, kind: str = "q8_0") -> Path:
    """``source`` as an LM GGUF of ``kind`` beside its f16 mmproj (once)."""
    directory = CACHE / f"{source.name}-gguf"
    lm, mmproj = directory / f"lm-{kind}.gguf", directory / "mmproj-f16.gguf"
    tools = None
    for out, extra in ((lm, ["--no-mtp", "--outtype", kind]), (mmproj, ["--mmproj", "--outtype", "f16"])):
        if out.exists():
            continue
        if tools is None:
            done = subprocess.run(["sh", str(ROOT / "scripts" / "fetch_llama_cpp.sh"), "--converter-only"], check=True,
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHON": sys.executable})
            tools = Path(done.stdout.strip().splitlines()[-1])
        print(f"converting {source} to {out} (once)", flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(tools / "convert_hf_to_gguf.py"), str(source), "--outfile", str(tmp), *extra],
                       check=True, env={**os.environ, "PYTHONPATH": str(tools / "gguf-py")}, stdout=subprocess.DEVNULL)
        tmp.rename(out)
    return lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from minicpmv.checkpoint import resolve
    from minicpmv.model import kernels

    source = demo_checkpoint(args.size)
    variants = {"ours int8": (source, {"quantization": "int8"}), "GGUF Q8_0": (resolve(convert(source)), {})}
    got = interleaved_decode_rates(variants, args.decode_tokens, args.rounds)
    ours = got["ours int8"]["rate"]
    rows = [[name, g["rate"], g["rate"] / ours, g["load_seconds"]] for name, g in got.items()]
    print(f"kernels: {kernels.active_isa()}, threads: {torch.get_num_threads()}, {args.size} model, "
          f"{args.decode_tokens} tokens x {args.rounds} rounds, a process per model and round")
    print(table(rows, ["weights", "decode tok/s", "vs ours int8", "load s"]))
    for name, g in got.items():
        if g["format"]:
            fmt = g["format"]
            print(f"{name}: {fmt['quantized_linears']} linears in the {fmt['kernels']} kernels; "
                  f"dequantized: {fmt['dequantized'] or '-'}"[:300])


if __name__ == "__main__":
    main()
