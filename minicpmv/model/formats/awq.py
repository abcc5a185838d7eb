"""awq: see read()."""

from __future__ import annotations

from pathlib import Path

from minicpmv.errors import CheckpointError
from minicpmv.model.formats import Loaded


def read(source: Path, cfg, dense: bool, progress: bool | None = None) -> Loaded:
    raise CheckpointError("awq checkpoints: not implemented yet")
