"""Decode speed of other tools' int4 checkpoints (GPTQ, AWQ) against our own int4, same weights, same run.

The full-size random-weight checkpoint (bench/common.py) is quantized once per format, round to nearest, with the
layouts those tools write: GPTQ v1 (asymmetric, zero points minus one) and AWQ GEMM (interleaved nibbles), both int4
in groups of 128 on every language-model linear (GPTQModel's set: in_proj_a/b stay bf16). The tied head stays bf16
(its 248094 rows are not a multiple of the 8 values an int32 packs), so ours is measured twice: as it loads (an int4
head) and with its head repacked in bf16 like theirs. They load through minicpmv.model.formats into the int4 kernels
with zero points, as stored and with ``quantization="int4"`` (their bf16 head quantized at load, the rest as stored);
ours is ``quantization="int4", group_size=128`` on the bf16 checkpoint. One stream, greedy, in interleaved rounds
with a fresh process per model and round (the best of each). Target: GPTQ / AWQ within 10% of ours.

Usage: python bench/quant_formats.py [--size full|tiny] [--decode-tokens 64] [--rounds 3] [--group 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE, demo_checkpoint, interleaved_decode_rates, table  # noqa: E402

GROUP = 128
SKIP = ("in_proj_a", "in_proj_b")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack(values: torch.Tensor, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """4-bit values (0..15) packed eight to an int32 word along ``dim`` (slot s: index 8 j + s, or 8 j + order[s])."""
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    if order is not None:
        v = v[..., order]
    words = (v << (4 * torch.arange(8))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).movedim(-1, dim).contiguous()


def rtn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest in groups of GROUP inputs: q [K, N], zeros [G, N] (1..15), scales fp16 [G, N]."""
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-8).half()
    zeros = torch.round(-lo / scales.float()).clamp(1, 15)
    q = torch.round(g / scales.float()[..., None] + zeros[..., None]).clamp(0, 15).view(n, k)
    return q.t(), zeros.t(), scales.t().contiguous()


def write(source: Path, kind: str) -> Path:
    """``source`` as a GPTQ or AWQ checkpoint (once)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = CACHE / f"{source.name}-{kind}-g{GROUP}"
    if (path / "config.json").exists():
        return path
    print(f"writing a {kind} checkpoint to {path} (once)", flush=True)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        if "lm_head.weight" not in names:
            names.append("lm_head.weight")
        for name in names:
            t = f.get_tensor("model.language_model.embed_tokens.weight" if name == "lm_head.weight" and name not in f.keys() else name)
            base = name[: -len(".weight")]
            linear = (name.startswith("model.language_model.layers.") and t.dim() == 2 and not base.endswith(SKIP)
                      and "norm" not in name) or (name == "lm_head.weight" and t.shape[0] % 8 == 0)
            if not linear:
                if name in f.keys():  # (a tied head left in bf16 stays the embedding)
                    tensors[name] = t
                continue
            q, zeros, scales = rtn(t)
            if kind == "gptq":  # v1: zero points minus one; g_idx trivial
                tensors.update({f"{base}.qweight": pack(q, 0), f"{base}.qzeros": pack(zeros - 1, 1),
                                f"{base}.scales": scales, f"{base}.g_idx": (torch.arange(t.shape[1]) // GROUP).int()})
            else:
                tensors.update({f"{base}.qweight": pack(q, 1, AWQ_ORDER), f"{base}.qzeros": pack(zeros, 1, AWQ_ORDER),
                                f"{base}.scales": scales})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for f in source.iterdir():
        if f.is_file() and f.name != "model.safetensors" and not f.name.startswith("model."):
            shutil.copy(f, path / f.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
         "checkpoint_format": "gptq", "lm_head": True} if kind == "gptq"
        else {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group", type=int, choices=[32, 64, 128], default=128, help="(--size tiny needs 32)")
    args = parser.parse_args()
    global GROUP
    GROUP = args.group
    from minicpmv.model import kernels

    source = demo_checkpoint(args.size)
    ours_name = f"ours int4 g{GROUP}"
    ours_kw = {"quantization": "int4", "group_size": GROUP}
    # The tools' files keep the (tied) head in bf16: 248094 rows are not a multiple of their 8-value packing.
    # With quantization="int4" that head (only) is quantized by us at load, as ours is.
    gptq, awq = write(source, "gptq"), write(source, "awq")
    variants = {ours_name: (source, ours_kw),
                f"ours int4 g{GROUP}, head bf16 like theirs": (source, {**ours_kw, "head_bf16": True}),
                f"GPTQ int4 g{GROUP} (zero points)": (gptq, {}),
                f"AWQ int4 g{GROUP} (zero points)": (awq, {}),
                "GPTQ, head quantized at load": (gptq, ours_kw),
                "AWQ, head quantized at load": (awq, ours_kw)}
    got = interleaved_decode_rates(variants, args.decode_tokens, args.rounds)
    ours = got[ours_name]["rate"]
    rows = [[name, g["rate"], g["rate"] / ours, g["load_seconds"]] for name, g in got.items()]
    print(f"kernels: {kernels.active_isa()}, threads: {torch.get_num_threads()}, {args.size} model, "
          f"{args.decode_tokens} tokens x {args.rounds} rounds, a process per model and round")
    print(table(rows, ["weights", "decode tok/s", "vs ours int4", "load s"]))


if __name__ == "__main__":
    main()
