"""Output: one record per input id, committed in atomic pieces, so that a rerun after a crash at any moment
(``kill -9`` included) resumes with every id exactly once.

- JSONL: each record is one line, appended and fsync'ed; on resume a torn last line (no newline, or not JSON) is
  cut off, and the ids of the whole lines are done.
- Parquet: OUTPUT is a folder of part files; each part is written to a hidden temporary name, fsync'ed and renamed
  into place; leftover temporaries are deleted on resume. ``pyarrow.parquet.read_table(OUTPUT)`` reads the lot.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from minicpmv.batch.rows import require_pyarrow
from minicpmv.errors import MiniCPMVError

FIELDS = ("id", "text", "reasoning", "tool_calls", "finish_reason", "usage", "error")
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "image_tokens", "video_tokens", "cached_tokens", "total_tokens")


def output_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise MiniCPMVError(f"output {str(path)!r}: give a .jsonl file or a .parquet folder, not {suffix or 'no extension'!r}")


def arrow_schema():
    pa = require_pyarrow()
    call = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
    usage = pa.struct([(name, pa.int64()) for name in USAGE_FIELDS])
    return pa.schema([
        ("id", pa.string()), ("text", pa.string()), ("reasoning", pa.string()), ("tool_calls", pa.list_(call)),
        ("finish_reason", pa.string()), ("usage", usage), ("error", pa.string()),
    ])


class JsonlSink:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = self._recover()
        self._file = open(self.path, "ab")

    def _recover(self) -> set[str]:
        done: set[str] = set()
        if not self.path.exists():
            return done
        good = 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    done.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    break
                good += len(line)
        if good != self.path.stat().st_size:  # a torn or broken tail: the rows in it are redone
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return done

    def write(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update(r["id"] for r in records)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()


class ParquetSink:
    """Buffers records and commits them as a part file every ``part_rows`` rows or ``part_seconds`` seconds."""

    def __init__(self, path: Path, part_rows: int = 256, part_seconds: float = 10.0):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise MiniCPMVError(f"Parquet output {str(self.path)!r} is a file; batch writes a folder of parts there")
        self.path.mkdir(parents=True, exist_ok=True)
        self.part_rows, self.part_seconds = part_rows, part_seconds
        self._buffer: list[dict] = []
        self._since = time.monotonic()
        self.done = self._recover()

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def _recover(self) -> set[str]:
        pq = require_pyarrow().parquet
        for tmp in self.path.glob(".part-*.tmp"):
            tmp.unlink()
        done: set[str] = set()
        for part in self._parts():
            done.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self._parts()), default=-1)
        return done

    def write(self, records: list[dict[str, Any]]) -> None:
        self._buffer.extend(records)
        if len(self._buffer) >= self.part_rows or time.monotonic() - self._since >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        self._since = time.monotonic()
        if not self._buffer:
            return
        pa = require_pyarrow()
        table = pa.Table.from_pylist(self._buffer, schema=arrow_schema())
        name = f"part-{self._next:06d}.parquet"
        tmp = self.path / f".{name}.tmp"
        pa.parquet.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, self.path / name)
        directory = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.done.update(r["id"] for r in self._buffer)
        self._buffer = []
        self._next += 1

    def close(self) -> None:
        self.flush()


def open_sink(path: Path, **kw):
    return JsonlSink(path) if output_format(path) == "jsonl" else ParquetSink(path, **kw)


def read_output(path: Path) -> list[dict]:
    """Every committed record of an output (for tests and tools)."""
    if output_format(path) == "jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    pq = require_pyarrow().parquet
    parts = sorted(Path(path).glob("part-*.parquet"))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]
