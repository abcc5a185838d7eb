"""The local runner: rows stream through one ``LLM`` with at most ``window`` rows in flight (continuous batching:
a finished row's slot is refilled at once), each result committed to the sink as it comes."""

from __future__ import annotations

import dataclasses
import queue
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from minicpmv.batch.rows import BatchInputError, input_base, read_rows, to_request
from minicpmv.batch.sink import open_sink
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import MiniCPMVError


@dataclass
class JobSpec:
    """What every row shares: the chat options and sampling defaults a row's own fields override."""

    options: dict[str, Any] = field(default_factory=dict)  # ChatOptions fields
    sampling: SamplingParams = field(default_factory=SamplingParams)
    base: Path | None = None  # relative media paths are read from here
    prompt: str | None = None  # for rows without a prompt or messages


@dataclass
class Summary:
    rows: int = 0
    failed: int = 0
    skipped: int = 0  # already in OUTPUT (resume)
    duplicates: int = 0  # ids seen twice in the input (the first one wins)
    completion_tokens: int = 0
    seconds: float = 0.0
    first_output_seconds: float | None = None  # when the first rows were committed
    ready_seconds: float = 0.0  # when the first engine could take rows (Ray: after its start and the model loads)

    def committed(self, rows: int, start: float) -> None:
        if self.first_output_seconds is None and rows:
            self.first_output_seconds = time.perf_counter() - start

    def running_rows_per_second(self) -> float:
        """Rows/s from the first engine's start on: the throughput without start-up (Ray's workers and their model
        loads; local mode loads its model before the job)."""
        running = self.seconds - self.ready_seconds
        return self.rows / running if running > 0 else 0.0

    def line(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        tps = self.completion_tokens / self.seconds if self.seconds else 0.0
        return (f"{self.rows} rows done ({self.failed} failed), {self.skipped} already done, "
                f"{self.duplicates} duplicate ids; {rate:.2f} rows/s, {tps:.1f} tokens/s in {self.seconds:.1f} s"
                + (f" (first rows after {self.first_output_seconds:.1f} s)" if self.first_output_seconds else ""))


def error_record(row_id: str, exc: BaseException) -> dict:
    message = " ".join(str(exc).split()) or type(exc).__name__
    param = getattr(exc, "param", None)
    return {"id": row_id, "text": None, "reasoning": None, "tool_calls": [], "finish_reason": None, "usage": None,
            "error": f"{type(exc).__name__}: {message}" + (f" (param: {param})" if param else "")}


def result_record(row_id: str, result) -> dict:
    usage = {**dataclasses.asdict(result.usage), "total_tokens": result.usage.total_tokens}
    calls = [{"id": c.id, "name": c.name, "arguments": c.arguments_json} for c in result.tool_calls]
    return {"id": row_id, "text": result.text, "reasoning": result.reasoning, "tool_calls": calls,
            "finish_reason": result.finish_reason, "usage": usage, "error": None}


def _prepare(llm, row: dict, spec: JobSpec):
    from minicpmv.llm import ChatOptions

    request = to_request(row, spec.base, spec.prompt)
    options = ChatOptions.build(dataclasses.asdict(llm.default_options), {**spec.options, **request.options})
    params = dataclasses.replace(spec.sampling, **request.sampling)
    params.validate()
    return llm.prepare(request.messages, params, options)


def run_rows(llm, rows: Iterable[dict], spec: JobSpec, window: int) -> Iterator[dict]:
    """A record per row, in the order rows finish. At most ``window`` rows are prepared and not yet finished."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    in_flight: dict[str, Any] = {}  # request id -> (row id, seq)
    rows = iter(rows)
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < window:
                row = next(rows, None)
                if row is None:
                    exhausted = True
                    break
                try:
                    seq = _prepare(llm, row, spec)
                except (MiniCPMVError, ValueError, TypeError, OSError) as exc:
                    yield error_record(row["id"], exc)
                    continue
                in_flight[seq.request_id] = (row["id"], seq)
                llm.submit(seq, lambda item, rid=seq.request_id: inbox.put((rid, item)))
            if not in_flight:
                return
            rid, item = inbox.get()
            if rid not in in_flight or item is None:
                continue
            row_id, seq = in_flight[rid]
            if isinstance(item, Exception):
                del in_flight[rid]
                yield error_record(row_id, item)
            elif item.finished:
                del in_flight[rid]
                yield result_record(row_id, llm.result(seq))
    finally:
        for rid in in_flight:  # left early (an error, a closed generator): nothing stays in the engine
            llm.abort(rid)


def pending_rows(rows: Iterable[dict], done: set[str], summary: Summary) -> Iterator[dict]:
    """Rows whose id is not yet in the output; a repeated input id is counted and left out (the first one wins)."""
    seen: set[str] = set()
    for row in rows:
        if row["id"] in done:
            summary.skipped += 1
        elif row["id"] in seen:
            summary.duplicates += 1
            print(f"minicpmv batch: duplicate id {row['id']!r} in the input: only its first row is run", file=sys.stderr)
        else:
            seen.add(row["id"])
            yield row


def count_rows(path: Path, prompt: str | None) -> int | None:
    """The input's row count for the progress bar's ETA, when cheap to know (Parquet metadata, a folder listing)."""
    from minicpmv.batch.rows import input_format, media_files, require_pyarrow

    kind = input_format(path)
    if kind == "parquet":
        return require_pyarrow().parquet.ParquetFile(path).metadata.num_rows
    if kind == "folder":
        return sum(1 for _ in media_files(path))
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip()) - (1 if kind == "csv" else 0)


class Progress:
    """tqdm bar over rows with tokens/s in its postfix."""

    def __init__(self, total: int | None, skipped: int, show: bool | None):
        self.bar = tqdm(total=total, initial=skipped, unit="row", desc="batch", disable=None if show is None else not show,
                        dynamic_ncols=True)
        self.start = time.perf_counter()
        self.tokens = 0

    def update(self, record: dict) -> None:
        if record.get("usage"):
            self.tokens += record["usage"]["completion_tokens"]
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_job(llm, input_path: Path, output_path: Path, spec: JobSpec, prompt: str | None = None,
            window: int | None = None, progress: bool | None = None, commit_rows: int = 1) -> Summary:
    """Run every input row not yet in OUTPUT through ``llm``; returns the summary."""
    input_path, output_path = Path(input_path), Path(output_path)
    spec.base = spec.base or input_base(input_path)
    spec.prompt = spec.prompt or prompt
    if input_path.resolve() == output_path.resolve():
        raise BatchInputError("INPUT and OUTPUT are the same file")
    sink = open_sink(output_path)
    summary = Summary()
    window = window or 2 * llm.engine.config.max_num_seqs
    start = time.perf_counter()
    total = count_rows(input_path, prompt)
    bar = Progress(total, 0, progress)
    pending = pending_rows(read_rows(input_path, prompt), sink.done, summary)
    buffer: list[dict] = []
    try:
        for record in run_rows(llm, _counting(pending, bar, summary), spec, window):
            summary.rows += 1
            summary.failed += record["error"] is not None
            if record["usage"]:
                summary.completion_tokens += record["usage"]["completion_tokens"]
            buffer.append(record)
            if len(buffer) >= commit_rows:
                sink.write(buffer)
                summary.committed(len(buffer), start)
                buffer = []
            bar.update(record)
        sink.write(buffer)
    finally:
        sink.close()
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _counting(rows: Iterator[dict], bar: Progress, summary: Summary) -> Iterator[dict]:
    """Rows skipped by resume still move the bar (its total counts every input row)."""
    skipped = 0
    for row in rows:
        if summary.skipped + summary.duplicates != skipped:
            bar.bar.update(summary.skipped + summary.duplicates - skipped)
            skipped = summary.skipped + summary.duplicates
        yield row
    bar.bar.update(summary.skipped + summary.duplicates - skipped)
