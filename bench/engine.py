"""Engine benchmark on the full-size random-weight checkpoint (bf16): ours beside transformers, same run.

Reports single-stream decode tokens/s, time to first token for a 448x448 and a 1344x1344 image, and aggregate
tokens/s at 1, 4 and 16 concurrent requests (peak memory: bench/cpu.py).
Usage: python bench/engine.py [--decode-tokens 32] [--gen-tokens 16] [--concurrency 1 4 16]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Timer, demo_checkpoint, image, table, user  # noqa: E402

PROMPTS = [f"Write a short story about a {animal} who learns to sail." for animal in
           ("cat", "dog", "fox", "owl", "bear", "wolf", "frog", "duck", "goat", "hare", "lynx", "mole", "newt", "seal", "swan", "yak")]



def measure_ours(ckpt: Path, decode_tokens: int, concurrency: list[int], gen_tokens: int) -> dict:
    from minicpmv import LLM, SamplingParams

    llm = LLM(ckpt, dtype="bfloat16", device="cpu", progress=False)
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    llm.chat(user("warm up"), greedy(4))
    out = {}
    stamps = []
    for _ in llm.chat_stream(user(PROMPTS[0]), greedy(decode_tokens + 1)):
        stamps.append(time.perf_counter())
    out["decode tok/s"] = decode_tokens / (stamps[-1] - stamps[0])
    for name, size, seed in (("TTFT 448x448 s", 448, 1), ("TTFT 1344x1344 s", 1344, 2)):
        t0 = time.perf_counter()
        stream = llm.chat_stream(user("Describe the image.", image(size, size, seed)), greedy(1), max_slice_nums=9)
        next(stream)
        out[name] = time.perf_counter() - t0
        stream.close()
    for n in concurrency:
        with Timer() as t:
            results = llm.chat([user(p + f" ({n})") for p in (PROMPTS * 2)[:n]], greedy(gen_tokens))
        out[f"aggregate tok/s @{n}"] = sum(len(r.token_ids) for r in results) / t.seconds
    del llm
    gc.collect()
    return out


def measure_transformers(ckpt: Path, decode_tokens: int, concurrency: list[int], gen_tokens: int) -> dict:
    from transformers import AutoProcessor, MiniCPMV4_6ForConditionalGeneration

    model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"

    def inputs(texts, images=None, **kw):
        prompts = [processor.apply_chat_template(user(t, *(images or [])), add_generation_prompt=True, tokenize=False,
                                                 enable_thinking=False) for t in texts]
        return processor(text=prompts, images=[images] if images else None, return_tensors="pt", padding=True, **kw)

    def generate(batch, n):
        with torch.inference_mode():
            return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    generate(inputs(["warm up"]), 4)
    out = {}
    one = inputs([PROMPTS[0]])
    with Timer() as first:
        generate(one, 1)
    with Timer() as full:
        generate(one, decode_tokens + 1)
    out["decode tok/s"] = decode_tokens / (full.seconds - first.seconds)
    for name, size, seed in (("TTFT 448x448 s", 448, 1), ("TTFT 1344x1344 s", 1344, 2)):
        with Timer() as t:
            generate(inputs(["Describe the image."], [image(size, size, seed)], max_slice_nums=9), 1)
        out[name] = t.seconds
    for n in concurrency:
        batch = inputs([p + f" ({n})" for p in (PROMPTS * 2)[:n]])
        with Timer() as t:
            generate(batch, gen_tokens)
        out[f"aggregate tok/s @{n}"] = n * gen_tokens / t.seconds
    del model
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=16, help="tokens per request in the concurrency runs")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    ckpt = demo_checkpoint()
    print(f"threads: {torch.get_num_threads()}, checkpoint: {ckpt}")
    ours = measure_ours(ckpt, args.decode_tokens, args.concurrency, args.gen_tokens)
    peer = measure_transformers(ckpt, args.decode_tokens, args.concurrency, args.gen_tokens)
    rows = []
    for key in ours:
        higher_is_better = "tok/s" in key
        ratio = ours[key] / peer[key] if higher_is_better else peer[key] / ours[key]
        rows.append([key, ours[key], peer[key], f"{ratio:.2f}x"])
    print(table(rows, ["metric", "minicpmv", "transformers", "speed-up"]))


if __name__ == "__main__":
    main()
