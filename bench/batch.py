"""Batch throughput on the full-size random checkpoint: 200 rows with images, local mode vs Ray Data with 1 worker
and with 2 workers (1 thread each): rows/s, tokens/s, Ray's overhead against local at the same thread count, and
the 1 -> 2 worker scaling. Greedy, a fixed number of tokens per row (ignore_eos), so every mode does the same work.
Figures are given running (from the moment the first engine is ready: Ray's start, its workers' start and model loads,
which local mode does before the clock starts, are left out) and over the whole wall time.

    python -m bench.batch [--rows 200] [--max-tokens 16] [--distinct-images]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# One thread per engine, local and Ray alike (LLM() otherwise takes every core; Ray sets it in its actors), read by
# OpenMP when torch loads it.
os.environ["OMP_NUM_THREADS"] = "1"

import PIL.Image  # noqa: E402
import torch  # noqa: E402

from bench.common import demo_checkpoint, image  # noqa: E402
from minicpmv.batch.job import JobSpec, run_job  # noqa: E402
from minicpmv.engine.engine import EngineConfig  # noqa: E402
from minicpmv.engine.sampling import SamplingParams  # noqa: E402


def write_input(folder: Path, rows: int, images: int = 8) -> Path:
    """``rows`` rows over ``images`` pictures (row i shows picture i % images)."""
    for i in range(images):
        PIL.Image.fromarray(image(448, 336, seed=i)).save(folder / f"{i}.png")
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "image": f"{i % images}.png", "prompt": f"Describe picture {i}."})
                            + "\n" for i in range(rows)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--distinct-images", action="store_true",
                        help="a picture per row, as in a photo library (default: 8 pictures repeated, so each engine "
                             "encodes 8 and then hits its vision cache)")
    args = parser.parse_args()
    model = demo_checkpoint("full")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = write_input(tmp, args.rows, args.rows if args.distinct_images else 8)

        from minicpmv.llm import LLM

        llm = LLM(model, device="cpu", engine_config=EngineConfig(max_num_seqs=args.max_num_seqs), progress=False)
        assert torch.get_num_threads() == 1
        start = time.perf_counter()
        s = run_job(llm, source, tmp / "local.jsonl", JobSpec(sampling=params), progress=False)
        results["local, 1 thread"] = (s, time.perf_counter() - start)
        llm.close()

        import ray

        from minicpmv.batch.ray_runner import RayJob, run_ray_job

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        for workers in (1, 2):
            job = RayJob(model=str(model), max_num_seqs=args.max_num_seqs, workers=workers, threads=1)
            start = time.perf_counter()
            s = run_ray_job(job, source, tmp / f"ray{workers}.jsonl", JobSpec(sampling=params), progress=False)
            results[f"ray, {workers} worker(s) x 1 thread"] = (s, time.perf_counter() - start)
        ray.shutdown()

    print(f"{'mode':32} {'rows':>5} {'failed':>6} {'rows/s':>8} {'tokens/s':>9} {'wall s':>7} {'start-up s':>10} "
          f"{'first rows s':>12} {'running rows/s':>14}")
    wall_rate, running = {}, {}
    for name, (s, wall) in results.items():
        wall_rate[name], running[name] = s.rows / wall, s.running_rows_per_second()
        print(f"{name:32} {s.rows:5d} {s.failed:6d} {s.rows / wall:8.3f} {s.completion_tokens / wall:9.1f} {wall:7.1f} "
              f"{s.ready_seconds:10.1f} {s.first_output_seconds:12.1f} {running[name]:14.3f}")
    for label, rate in (("running (from the first engine's start)", running), ("wall time incl. start-up", wall_rate)):
        local, one, two = rate.values()
        print(f"{label}: Ray overhead at 1 worker vs local {100 * (local / one - 1):+.1f}% (target <= 10%); "
              f"1 -> 2 workers {two / one:.2f}x (target >= 1.7x)")

if __name__ == "__main__":
    main()
