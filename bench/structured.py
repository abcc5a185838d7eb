"""Constrained decoding benchmark on the full-size random-weight checkpoint: JSON-schema answers against free
answers of the same length, in the same run.

An extraction schema (13 fields: strings with bounds, enums, numbers, a nested array of line items). For 1 and 16
concurrent streams it prints tokens/s of free decoding, of constrained decoding step by step (jump-forward off) and
of constrained decoding with jump-forward, the ratios to free decoding, the mask time per token (filled, and applied
to the logits), and the compile time per schema. The engine fills masks on a thread while the forward runs; the
column "masks before forward" fills them on the engine thread before it instead.
Usage: python bench/structured.py [--streams 1 16] [--dtype bfloat16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Timer, demo_checkpoint, table, user  # noqa: E402

WORD = {"type": "string", "maxLength": 12}
EXTRACTION = {
    "type": "object",
    "additionalProperties": False,
    "required": ["vendor", "invoice_number", "date", "currency", "payment_method", "status", "subtotal", "tax_rate",
                 "total", "customer", "line_items", "notes", "confidence"],
    "properties": {
        "vendor": WORD,
        "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{5}$"},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "currency": {"enum": ["EUR", "USD", "GBP", "JPY"]},
        "payment_method": {"enum": ["card", "cash", "transfer", "other"]},
        "status": {"enum": ["paid", "open", "overdue"]},
        "subtotal": {"type": "number", "minimum": 0, "maximum": 100000, "multipleOf": 0.01},
        "tax_rate": {"type": "number", "minimum": 0, "maximum": 0.3, "multipleOf": 0.01},
        "total": {"type": "number", "minimum": 0, "maximum": 100000, "multipleOf": 0.01},
        "customer": {"type": "object", "additionalProperties": False, "required": ["name", "country"],
                     "properties": {"name": WORD, "country": {"type": "string", "pattern": "^[A-Z]{2}$"}}},
        "line_items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "additionalProperties": False, "required": ["description", "quantity", "unit_price"],
            "properties": {"description": WORD, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                           "unit_price": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.01}}}},
        "notes": {"type": ["string", "null"], "maxLength": 12},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
    },
}
PROMPT = "Extract the invoice fields as JSON: ACME Tools, INV-20931, 2026-03-14, 3 hammers at 12.50 EUR, card."


def run(llm, n: int, params) -> tuple[float, int, list]:
    """tokens/s of n concurrent requests (continuous batching), total output tokens, the results."""
    convs = [user(PROMPT + f" ({i})") for i in range(n)]
    with Timer() as t:
        results = llm.chat(convs, params)
    tokens = sum(len(r.token_ids) for r in results)
    return tokens / t.seconds, tokens, results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each variant is kept")
    args = parser.parse_args()

    import jsonschema
    import torch

    from minicpmv import LLM, SamplingParams
    from minicpmv.engine.engine import EngineConfig
    from minicpmv.engine.sampling import StructuredOutputs
    from minicpmv.output.constraints import GrammarCompiler

    llm = LLM(demo_checkpoint("full"), dtype=args.dtype, device="cpu", progress=False,
              engine_config=EngineConfig(max_num_seqs=max(args.streams)))
    with Timer() as tok_build:
        llm.grammars.tokenizer
    spec = StructuredOutputs(json=EXTRACTION)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens, structured=spec)

    # Compile: validating the grammar and building a matcher; the first mask builds the lexer lazily.
    fresh = GrammarCompiler.from_tokenizer(llm.processor.tokenizer.backend, llm.grammars.vocab_size, llm.eos_token_ids)
    fresh._tokenizer = llm.grammars.tokenizer
    with Timer() as compile_t:
        c = fresh.constraint(spec)
    from minicpmv.output.constraints import fill_bitmask, mask_words

    with Timer() as first_mask:
        fill_bitmask([c], torch.empty((1, mask_words(fresh.vocab_size)), dtype=torch.int32))
    with Timer() as cached:
        fresh.constraint(spec)

    llm.chat(user("warm up"), [SamplingParams(temperature=0, max_tokens=4)])
    llm.chat(user("warm up"), [constrained])
    rows, figures = [], {}
    for n in args.streams:
        masks = llm.engine.masks
        best = dict(free=0.0, constrained=0.0, before_forward=0.0, jump_forward=0.0)
        fill = apply = count = forced = fast_tokens = 0
        for _ in range(args.rounds):  # interleaved; the best of each (this machine is shared and noisy)
            llm.engine.config.jump_forward = False
            before = (masks.count, masks.fill_seconds, masks.apply_seconds)
            slow, _, slow_results = run(llm, n, constrained)
            count += masks.count - before[0]
            fill += masks.fill_seconds - before[1]
            apply += masks.apply_seconds - before[2]
            # The same with the masks filled before the forward, on the engine thread, instead of beside it.
            llm.engine.config.overlap_masks = False
            before_forward, _, _ = run(llm, n, constrained)
            llm.engine.config.overlap_masks = True
            llm.engine.config.jump_forward = True
            forced_before = masks.forced
            fast, fast_tokens, fast_results = run(llm, n, constrained)
            forced = masks.forced - forced_before
            # Free decoding of the same number of tokens, request by request (equal lengths would keep a full batch
            # to the end, while constrained answers of different lengths leave it one by one).
            lengths = [len(r.token_ids) for r in slow_results]
            free, _, _ = run(llm, n, [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in lengths])
            for key, value in dict(free=free, constrained=slow, before_forward=before_forward, jump_forward=fast).items():
                best[key] = max(best[key], value)
        # In fp32 jump-forward gives exactly the step-by-step tokens (tests/test_structured.py); in bf16 a chunk's
        # logits differ from one-token steps in the last bits, so a near tie can flip: count the identical answers.
        same = sum(a.token_ids == b.token_ids for a, b in zip(fast_results, slow_results))
        for r in [*fast_results, *slow_results]:
            assert r.finish_reason == "stop", r.text
            jsonschema.validate(json.loads(r.text), EXTRACTION)
        free = best["free"]
        rows.append([n, round(sum(lengths) / n), free, best["constrained"], best["jump_forward"],
                     best["constrained"] / free, best["jump_forward"] / free, best["before_forward"] / free,
                     fill / max(count, 1) * 1e6, apply / max(count, 1) * 1e6, f"{forced}/{fast_tokens}", f"{same}/{n}"])
        print(f"{n} streams: " + " ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in rows[-1]), flush=True)
        figures[n] = best
    print(f"\nfull-size random checkpoint, {args.dtype}, CPU threads {torch.get_num_threads()}; "
          f"schema: {len(EXTRACTION['properties'])} fields, line items; greedy")
    print(table(rows, ["streams", "tokens/req", "free tok/s", "constrained tok/s", "jump-fwd tok/s",
                       "constrained/free", "jump-fwd/free",
                       "masks before forward/free", "mask fill us/tok", "mask apply us/tok", "forced/total",
                       "same as step-by-step"]))
    print(f"grammar tokenizer build {tok_build.seconds:.2f} s (once per process); compile per schema "
          f"{compile_t.seconds * 1e3:.1f} ms + first mask {first_mask.seconds * 1e3:.1f} ms; cached {cached.seconds * 1e3:.2f} ms")
    print("example answer:", fast_results[0].text)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
