"""Quantized quality: int8 and int4 against bf16 on the full-size random checkpoint and on a tiny one.

bf16 decodes 256 greedy tokens after a 32-token prompt; each quantized model reads the same tokens (teacher
forcing) and we count how often its top-1 token equals bf16's and the mean cosine of the two logit vectors. bf16 is
the default (packed kernels); float32 and plain-PyTorch bf16 give the noise floor: how far an exact change of
arithmetic alone moves the same model.
A random model's logits are nearly tied (its top-2 margin is printed), so its agreement is the worst case: a trained
model's large margins absorb far more noise.

Usage: python bench/quality.py [--steps 256] [--sizes full,tiny]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import demo_checkpoint, table  # noqa: E402


@torch.inference_mode()
def logits_along(model, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """float32 logits after the prompt and after each of ``tokens`` fed one at a time."""
    state = model.new_state()
    out = [model(prompt, [state])]
    out += [model(torch.tensor([t]), [state]) for t in tokens]
    return torch.cat(out).float()


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    state, tokens = model.new_state(), []
    logits = [model(prompt, [state])]
    for _ in range(steps - 1):
        tokens.append(int(logits[-1][0].argmax()))
        logits.append(model(torch.tensor([tokens[-1]]), [state]))
    return tokens, torch.cat(logits).float()


def measure(checkpoint: Path, steps: int) -> list[list]:
    from minicpmv.checkpoint import load_model

    prompt = torch.randint(0, 150000, (32,), generator=torch.Generator().manual_seed(0))
    tokens, reference = greedy(load_model(checkpoint, dtype="bfloat16"), prompt, steps)
    top2 = reference.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]) / reference.std(dim=-1)
    print(f"{checkpoint.name}: bf16 top-2 margin in logit standard deviations: median {margin.median():.3f}, "
          f"10th percentile {margin.quantile(0.1):.3f}", flush=True)
    rows = []
    for name, kwargs in [("float32 (plain PyTorch)", {"dtype": "float32"}), ("bf16 (plain PyTorch)", {"optimize": False}),
                         ("int8", {"quantization": "int8"}), ("int4", {"quantization": "int4"})]:
        got = logits_along(load_model(checkpoint, **{"dtype": "bfloat16", **kwargs}), prompt, tokens)
        top1 = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
        cosine = F.cosine_similarity(got, reference, dim=-1).mean().item()
        rows.append([checkpoint.name, name, f"{100 * top1:.1f}%", f"{cosine:.5f}"])
        print(" | ".join(rows[-1]), flush=True)
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--sizes", default="full,tiny")
    args = parser.parse_args()
    from minicpmv.model import fast

    fast.set_threads()
    rows = []
    for size in args.sizes.split(","):
        rows += measure(demo_checkpoint(size), args.steps)
    print()
    print(table(rows, ["checkpoint", "model", "top-1 agreement with bf16", "mean logit cosine"]))


if __name__ == "__main__":
    main()
