"""``minicpmv batch --ray``: the same rows on Ray Data. read -> drop ids already in OUTPUT -> read into blocks
of ``rows_per_block`` rows (so even a small input feeds every worker) -> ``map_batches`` with ``Worker`` (a callable
class holding one ``minicpmv.LLM``) on an actor pool of ``workers`` actors of ``threads`` CPUs -> the driver commits
each finished batch through the same sink as local mode.

Exactly once: a worker that dies is restarted (``max_restarts``) and the batch it held is run again
(``max_task_retries``); a batch's records reach the driver only when the whole batch is done, and the driver's sink
skips any id it already committed, so OUTPUT holds each id once. Rows travel as JSON text (``row``), so messages of
any shape cross Arrow without a schema.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from minicpmv.batch.job import JobSpec, Progress, Summary, count_rows, run_rows
from minicpmv.batch.rows import input_base, input_format, media_files, VIDEO_EXTENSIONS
from minicpmv.batch.sink import open_sink
from minicpmv.errors import MiniCPMVError


# reading and keying rows takes no CPU reservation: it must not wait for CPUs that the engine actors hold (workers x
# threads may be the whole cluster)
LIGHT = 0
# Each actor runs CALLS_PER_ACTOR batches of a quarter of its engine's max_num_seqs at once: one and a half engines'
# worth of rows in flight, so it stays full between batches, and a worker's last batch is short (a job's tail, where
# one worker has nothing left, is about a batch: bench/batch.py --distinct-images, 100 rows, 1 -> 2 workers 1.51x
# with three batches of half, 1.77x so).
BATCH_SHARE = 4
CALLS_PER_ACTOR = 6
MIN_BATCH = 2  # (each batch costs Ray Data time: 1-row batches took the 100-row kill test from 91 s to 175 s)


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MiniCPMVError("--ray needs Ray: pip install 'minicpmv[ray]'") from None
    return ray


@dataclass
class RayJob:
    model: str
    dtype: str = "auto"
    max_num_seqs: int = 16
    max_model_len: int | None = None
    quantization: str | None = None
    workers: int = 1
    threads: int = 1
    address: str | None = None  # None: start (or join) a local cluster
    rows_per_block: int | None = None  # default: max_num_seqs / BATCH_SHARE
    pid_dir: str | None = None  # each worker writes its pid here (monitoring, tests)


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy arrays / scalars from Arrow columns
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def _keyed(row: dict) -> dict:
    """A parsed row -> {"id", "row": its JSON}; a row without a usable id fails the job (as in local mode)."""
    from minicpmv.batch.rows import _with_id

    clean = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and v != v)}
    clean = _with_id(clean, f"row {clean.get('id', '?')!r}")
    return {"id": clean["id"], "row": json.dumps(clean, default=_jsonable)}


def _from_line(item: dict) -> dict:
    try:
        row = json.loads(item["text"])
    except json.JSONDecodeError as exc:
        return {"id": f"line:{hash(item['text'])}", "row": json.dumps({"id": "?", "__error__": f"not JSON: {exc}"})}
    return _keyed(row)


def read_dataset(path: Path, prompt: str | None, blocks: int):
    ray = require_ray()
    kind = input_format(path)
    if kind == "jsonl":
        return ray.data.read_text(str(path), num_cpus=LIGHT, override_num_blocks=blocks).map(_from_line, num_cpus=LIGHT)
    if kind == "csv":
        import pyarrow.csv as pacsv

        # every column as text, as the local reader sees it (ids like 007 stay as written)
        options = pacsv.ConvertOptions(strings_can_be_null=True, column_types=None, auto_dict_encode=False)
        return ray.data.read_csv(str(path), convert_options=options, num_cpus=LIGHT, override_num_blocks=blocks).map(_keyed, num_cpus=LIGHT)
    if kind == "parquet":
        return ray.data.read_parquet(str(path), num_cpus=LIGHT, override_num_blocks=blocks).map(_keyed, num_cpus=LIGHT)
    items = []
    for rel in media_files(path):
        media = "video" if rel.suffix.lower() in VIDEO_EXTENSIONS else "image"
        items.append({"id": rel.as_posix(), "row": json.dumps({"id": rel.as_posix(), media: str(path / rel), "prompt": prompt})})
    return ray.data.from_items(items, override_num_blocks=blocks) if items else ray.data.from_items([{"id": "", "row": ""}]).filter(lambda r: False)


class Worker:
    """One engine per actor; each call runs a batch of rows with continuous batching and returns their records.
    Calls come from ``CALLS_PER_ACTOR`` threads at once: they share the engine (``LLM`` takes concurrent requests)."""

    def __init__(self, job: RayJob, spec: JobSpec):
        import torch

        from minicpmv.engine.engine import EngineConfig
        from minicpmv.llm import LLM

        torch.set_num_threads(job.threads)
        if job.pid_dir:
            Path(job.pid_dir, f"{os.getpid()}.pid").write_text(str(os.getpid()))
        config = EngineConfig(max_num_seqs=job.max_num_seqs, max_model_len=job.max_model_len)
        self.llm = LLM(job.model, dtype=job.dtype, device="cpu", engine_config=config, quantization=job.quantization,
                       progress=False)
        self.spec = spec
        self.window = 2 * job.max_num_seqs
        self.ready = time.time()  # (for the summary's running rate)

    def __call__(self, batch: dict) -> dict:
        rows = [json.loads(text) for text in batch["row"]]
        records = list(run_rows(self.llm, rows, self.spec, self.window))
        return {"id": [r["id"] for r in records], "record": [json.dumps(r, ensure_ascii=False) for r in records],
                "ready": [self.ready] * len(records)}


def run_ray_job(job: RayJob, input_path: Path, output_path: Path, spec: JobSpec, prompt: str | None = None,
                progress: bool | None = None) -> Summary:
    ray = require_ray()
    input_path, output_path = Path(input_path).resolve(), Path(output_path)
    spec.base = spec.base or input_base(input_path).resolve()
    spec.prompt = spec.prompt or prompt
    sink = open_sink(output_path)
    summary = Summary()
    start, wall_start, ready = time.perf_counter(), time.time(), float("inf")
    if not ray.is_initialized():
        ray.init(address=job.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    done = set(sink.done)
    summary.skipped = 0
    block = job.rows_per_block or max(MIN_BATCH, job.max_num_seqs // BATCH_SHARE)
    total = count_rows(input_path, prompt)
    # read into blocks of about ``block`` rows (a repartition would hold a CPU the actors may all have taken)
    ds = read_dataset(input_path, spec.prompt, max(job.workers, -(-(total or 1) // block)))
    if done:
        ds = ds.filter(lambda r: r["id"] not in done, num_cpus=LIGHT)
    ds = ds.map_batches(
        Worker, fn_constructor_kwargs={"job": job, "spec": spec}, batch_size=block,
        # CALLS_PER_ACTOR batches at a time in each actor, into its one engine
        compute=ray.data.ActorPoolStrategy(size=job.workers, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                           enable_true_multi_threading=True),
        num_cpus=job.threads,
        max_restarts=-1, max_task_retries=-1,
    )
    bar = Progress(total, 0, progress)
    bar.bar.update(len(done))
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if len(batch["ready"]):
                ready = min(ready, float(batch["ready"].min()))
            fresh = []
            for text in batch["record"]:
                record = json.loads(text)
                if record["id"] in sink.done or any(r["id"] == record["id"] for r in fresh):
                    summary.duplicates += 1  # an id twice in the input (or a batch that was run twice)
                    continue
                fresh.append(record)
                summary.rows += 1
                summary.failed += record["error"] is not None
                if record["usage"]:
                    summary.completion_tokens += record["usage"]["completion_tokens"]
                bar.update(record)
            sink.write(fresh)
            summary.committed(len(fresh), start)
    finally:
        sink.close()
        bar.close()
    summary.skipped = len(done)
    summary.seconds = time.perf_counter() - start
    summary.ready_seconds = min(max(ready - wall_start, 0.0), summary.seconds)
    return summary
