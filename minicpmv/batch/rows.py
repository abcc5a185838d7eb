"""Input rows, read as a stream, and one row -> (messages, chat options, sampling params).

A row is a dict: ``id`` (required, unique), then either ``messages`` (OpenAI chat format; media as paths, URLs or
data URIs) or ``image`` / ``video`` plus ``prompt``, and optional per-row options (ROW_OPTIONS). Columns not named
here are ignored (metadata columns may ride along). Relative media paths are taken from the input file's folder.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minicpmv.engine.sampling import StructuredOutputs
from minicpmv.errors import InvalidInputError, MiniCPMVError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
INPUT_FORMATS = ("jsonl", "parquet", "csv", "folder")
# per-row options: where each goes, and how a CSV cell (always text) is read
ROW_CHAT_OPTIONS = {"downsample_mode": str, "max_slice_nums": int, "enable_thinking": None}
ROW_SAMPLING_OPTIONS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}
ROW_FIELDS = {"id", "messages", "image", "video", "prompt", "response_format", *ROW_CHAT_OPTIONS, *ROW_SAMPLING_OPTIONS}


class BatchInputError(MiniCPMVError):
    """The input as a whole cannot be read (missing file, unknown format, a row without an id)."""


def require_pyarrow(what: str = "Parquet files"):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MiniCPMVError(f"{what} need pyarrow: pip install 'minicpmv[batch]'") from None
    return pyarrow


def input_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise BatchInputError(f"input {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    formats = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
    if suffix not in formats:
        raise BatchInputError(f"input {str(path)!r}: give a .jsonl, .parquet or .csv file or a folder, not {suffix!r}")
    return formats[suffix]


def media_files(folder: Path) -> Iterator[Path]:
    """Image and video files under ``folder``, in a stable order (sorted walk), as relative paths."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
                yield (Path(root) / name).relative_to(folder)


def read_rows(path: Path, prompt: str | None = None, batch_rows: int = 64) -> Iterator[dict]:
    """Rows of the input, one at a time (never the whole file in memory)."""
    path = Path(path)
    kind = input_format(path)
    if kind == "folder":
        if not prompt:
            raise BatchInputError("a folder input needs --prompt (the question asked of every file)")
        for rel in media_files(path):
            media = "video" if rel.suffix.lower() in VIDEO_EXTENSIONS else "image"
            yield {"id": rel.as_posix(), media: str(path / rel), "prompt": prompt}
    elif kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    row = {"id": _id_in_broken_line(line, number), "__error__": f"line {number} is not JSON: {exc}"}
                if not isinstance(row, dict):
                    row = {"id": f"line:{number}", "__error__": f"line {number} is not a JSON object"}
                yield _with_id(row, f"line {number}")
    elif kind == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.DictReader(f), 2):
                yield _with_id({k: v for k, v in row.items() if v not in ("", None)}, f"line {number}")
    else:
        pq = require_pyarrow().parquet
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                number += 1
                yield _with_id({k: v for k, v in row.items() if v is not None}, f"row {number}")


def _id_in_broken_line(line: str, number: int) -> str:
    return f"line:{number}"


def _with_id(row: dict, where: str) -> dict:
    if "id" not in row or row["id"] in (None, ""):
        raise BatchInputError(f"{where} has no 'id' (every row needs a unique id)")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise BatchInputError(f"{where}: 'id' must be a string or an integer, got {type(row['id']).__name__}")
    row["id"] = str(row["id"])
    return row


@dataclass
class RowRequest:
    id: str
    messages: list[dict]
    options: dict[str, Any]  # ChatOptions overrides
    sampling: dict[str, Any]  # SamplingParams overrides


def _typed(name: str, value: Any, kind) -> Any:
    if kind is None:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        return value
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise InvalidInputError(f"{name} must be a {kind.__name__}, got {value!r}", param=name) from None
    return value


def _media_source(value: Any, base: Path | None, kind: str) -> Any:
    """Relative paths are read from the input's folder; file:// URLs become paths; http(s) is fetched."""
    if not isinstance(value, str):
        return value
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif value.startswith(("http://", "https://")):
        from minicpmv.batch.fetch import fetch_url

        return fetch_url(value, kind)
    elif value.startswith("data:"):
        return value
    if base is not None and not os.path.isabs(value):
        return str(base / value)
    return value


def _resolve_media(messages: list, base: Path | None) -> list:
    from minicpmv.processing.prompt import map_media

    return map_media(messages, lambda source, kind: _media_source(source, base, kind))


def to_request(row: dict, base: Path | None = None, prompt: str | None = None) -> RowRequest:
    """One row -> its request (``prompt`` for rows without one); a bad row raises InvalidInputError naming the field."""
    if "__error__" in row:
        raise InvalidInputError(row["__error__"])
    messages = row.get("messages")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"messages is not valid JSON: {exc}", param="messages") from None
    if messages is not None:
        if any(k in row for k in ("image", "video", "prompt")):
            raise InvalidInputError("give either 'messages' or 'image'/'video' + 'prompt', not both", param="messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} objects", param="messages")
    else:
        prompt = row.get("prompt", prompt)
        if not isinstance(prompt, str) or not prompt:
            raise InvalidInputError("a row needs 'messages', or a 'prompt' (with an 'image' or 'video')", param="prompt")
        content = []
        for kind in ("image", "video"):
            values = row.get(kind)
            for value in values if isinstance(values, list) else ([] if values is None else [values]):
                content.append({"type": kind, kind: value})
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
    options = {k: _typed(k, row[k], t) for k, t in ROW_CHAT_OPTIONS.items() if k in row}
    sampling = {k: _typed(k, row[k], t) for k, t in ROW_SAMPLING_OPTIONS.items() if k in row}
    if "response_format" in row:  # OpenAI's shape; JSON text in a CSV cell
        value = row["response_format"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"response_format is not valid JSON: {exc}", param="response_format") from None
        sampling["structured"] = StructuredOutputs.from_response_format(value)
    return RowRequest(row["id"], _resolve_media(messages, base), options, sampling)


def input_base(path: Path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent
