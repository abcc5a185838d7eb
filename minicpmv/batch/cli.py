"""``minicpmv batch``: the command's body (cli.py parses the flags)."""

from __future__ import annotations

import sys

from minicpmv.batch.job import JobSpec, run_job
from minicpmv.batch.rows import input_format, require_pyarrow
from minicpmv.batch.sink import output_format


def run(args, processing: dict, sampling, make_llm) -> int:
    """``make_llm()`` loads the model for local mode (the CLI's engine flags)."""
    # bad paths and missing extras fail before the model loads
    if "parquet" in (input_format(args.input), output_format(args.output)):
        require_pyarrow()
    if args.ray is not None:
        from minicpmv.batch.ray_runner import require_ray

        require_ray()
    options = {**{k: v for k, v in processing.items() if v is not None}, "enable_thinking": args.think}
    spec = JobSpec(options=options, sampling=sampling)
    if args.ray is not None:
        from minicpmv.batch.ray_runner import RayJob, run_ray_job

        summary = run_ray_job(RayJob(
            model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
            quantization=args.quantization, workers=args.workers, threads=args.threads_per_worker,
            address=None if args.ray == "local" else args.ray,
        ), args.input, args.output, spec, prompt=args.prompt, progress=args.progress)
    else:
        llm = make_llm()
        try:
            summary = run_job(llm, args.input, args.output, spec, prompt=args.prompt, window=args.window,
                              progress=args.progress)
        finally:
            llm.close()
    print(f"minicpmv batch: {summary.line()}", file=sys.stderr)
    return 1 if summary.failed else 0
