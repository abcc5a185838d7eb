"""LoRA benchmark on the full-size random-weight checkpoint (bf16, CPU): every figure beside the base, same run.

- decode tokens/s, one stream: the base, one unmerged adapter, the adapter merged (--merge-lora);
- aggregate decode tokens/s of 16 streams: all on the base, and spread over 4 adapters (4 streams each);
- LoRA training tokens/s (``minicpmv.finetune``, float32, gradient checkpointing) on text examples.

Decode rates are steady state: tokens timed from the step after every stream's first ``--skip`` tokens (prefill
and warm-up) to the first stream's end, so all streams decode throughout; rounds alternate between the peers.
Adapters are random PEFT-format LoRAs (rank --rank) on every language-model linear. Also printed: the share of each
model's packed weights on transparent huge pages (a model with fewer streams its weights slower).
Usage: python bench/lora.py [--decode-tokens 48] [--gen-tokens 24] [--skip 3] [--rank 8] [--rounds 3]
                            [--train-size full|tiny|none]
"""

from __future__ import annotations

import argparse
import gc
import json
import queue
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import demo_checkpoint, table, user  # noqa: E402

PROMPTS = [f"Write a short story about a {animal} who learns to sail." for animal in
           ("cat", "dog", "fox", "owl", "bear", "wolf", "frog", "duck", "goat", "hare", "lynx", "mole", "newt", "seal", "swan", "yak")]
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
              "gate_proj", "up_proj", "down_proj")


def write_adapter(directory: Path, ckpt: Path, rank: int, seed: int) -> Path:
    """A random PEFT LoRA on every language-model linear of the checkpoint (shapes from its tensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for name in f.keys():
            module = name.removesuffix(".weight")
            if not (module.startswith("model.language_model.") and module.rsplit(".", 1)[-1] in LM_LINEARS):
                continue
            out_features, in_features = f.get_slice(name).get_shape()
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.01
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))
    return directory


def decode_rate(llm, tokens: int, loras: list[str | None], skip: int) -> float:
    """Steady-state decode tokens/s of one stream per entry of ``loras`` (its adapter), all at once: the tokens
    after every stream's first ``skip`` outputs, up to the first stream's last output."""
    from minicpmv import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens + skip, ignore_eos=True)
    seqs = [llm.prepare(user(p), params, llm._conversations(user(p), {"lora": name})[0][1])
            for p, name in zip(PROMPTS, loras)]
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    for i, seq in enumerate(seqs):
        llm.submit(seq, lambda item, i=i: inbox.put((time.perf_counter(), i, item)))
    stamps: list[list[tuple[float, int]]] = [[] for _ in seqs]  # per stream: (time, tokens) of each output
    pending = len(seqs)
    while pending:
        t, i, item = inbox.get()
        if isinstance(item, Exception):
            raise item
        if item is not None:
            stamps[i].append((t, len(item.token_ids)))
            pending -= item.finished
    start = max(s[skip - 1][0] for s in stamps)
    end = min(s[-1][0] for s in stamps)
    if end <= start:
        raise RuntimeError(f"the {len(seqs)} streams did not decode together (max_num_seqs?): raise --gen-tokens")
    counted = sum(n for s in stamps for t, n in s if start < t <= end)
    return counted / (end - start)


def huge_page_share(model) -> float:
    """The share of ``model``'s packed weights that transparent huge pages back (from /proc/self/smaps)."""
    from minicpmv.model.kernels import PackedLinear

    ranges = [(m.weight.data_ptr(), m.weight.data_ptr() + m.weight.numel() * m.weight.element_size())
              for m in model.modules() if isinstance(m, PackedLinear)]
    total = sum(b - a for a, b in ranges) or 1
    huge, mapping = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                mapping = (lo, hi) if any(lo <= a < hi for a, _ in ranges) else None
            elif head == "AnonHugePages:" and mapping:
                huge += int(line.split()[1]) * 1024
    return huge / total


def training_rate(ckpt: Path, steps: int) -> float:
    from minicpmv.finetune import Example, FinetuneConfig, Trainer
    from minicpmv.llm import LLM

    llm = LLM(ckpt, dtype="float32", device="cpu", progress=False)
    data = [Example([{"role": "user", "content": p}], "Once upon a time there was a boat on a calm sea.") for p in PROMPTS]
    cfg = FinetuneConfig(rank=8, alpha=16, epochs=1, batch_size=4, lr=1e-4)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(llm, cfg, out, progress=False)
        trainer.train(data[: 4 * (steps + 1)], max_steps=1)  # warm-up step
        log = trainer.train(data[: 4 * (steps + 1)], max_steps=steps + 1)
    return sum(e["tokens_per_second"] for e in log[-steps:]) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=48, help="timed tokens, one stream")
    parser.add_argument("--gen-tokens", type=int, default=24, help="timed tokens per stream, 16 streams")
    parser.add_argument("--skip", type=int, default=3, help="first tokens of each stream left out (prefill, warm-up)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-size", choices=["full", "tiny", "none"], default="full")
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from minicpmv import LLM, SamplingParams

    ckpt = demo_checkpoint("full")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {f"a{i}": write_adapter(Path(tmp) / f"a{i}", ckpt, args.rank, i) for i in range(4)}
        llm = LLM(ckpt, dtype="bfloat16", device="cpu", progress=False, lora_modules=paths)
        merged_llm = LLM(ckpt, dtype="bfloat16", device="cpu", progress=False, merge_lora=paths["a0"])
        for model, lora in ((llm, "a0"), (llm, None), (merged_llm, None)):
            model.chat(user("warm up"), SamplingParams(temperature=0, max_tokens=4), lora=lora)
        # Rounds alternate between the peers and each figure keeps its best round: the machine's load drifts.
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, measure in (
                ("base", lambda: decode_rate(llm, args.decode_tokens, [None], args.skip)),
                ("unmerged", lambda: decode_rate(llm, args.decode_tokens, ["a0"], args.skip)),
                ("merged", lambda: decode_rate(merged_llm, args.decode_tokens, [None], args.skip)),
                ("base16", lambda: decode_rate(llm, args.gen_tokens, [None] * 16, args.skip)),
                ("mixed16", lambda: decode_rate(llm, args.gen_tokens, [f"a{i % 4}" for i in range(16)], args.skip)),
            ):
                best[name] = max(best.get(name, 0.0), measure())
        base, unmerged, merged, base16, mixed16 = (best[k] for k in ("base", "unmerged", "merged", "base16", "mixed16"))
        decoder = llm.model.model.language_model.fused_decode
        fused = (f"{decoder.lora_steps} of {decoder.steps} fused decode steps had adapter rows" if decoder
                 else "no fused decoder")
        huge = (f"packed weights on huge pages: base {huge_page_share(llm.model):.0%}, "
                f"merged {huge_page_share(merged_llm.model):.0%}")
        del llm, merged_llm, decoder
        gc.collect()
    rows.append(["decode tok/s, 1 stream: unmerged adapter", unmerged, base, unmerged / base, ">= 0.8"])
    rows.append(["decode tok/s, 1 stream: merged adapter", merged, base, merged / base, "= 1.0"])
    rows.append(["aggregate tok/s, 16 streams over 4 adapters", mixed16, base16, mixed16 / base16, ">= 0.7"])
    print(table(rows, ["figure", "LoRA", "base (same run)", "ratio", "target"]))
    print(f"{fused}; {huge}")
    if args.train_size != "none":
        rate = training_rate(demo_checkpoint(args.train_size), args.train_steps)
        print(f"LoRA training ({args.train_size} model, float32, CPU, batch 4, rank 8, all LM linears): {rate:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
