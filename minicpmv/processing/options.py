"""The model card's processing knobs, defined once: the Python API, the CLI, the server and the processor all read
:class:`ProcessingOptions`. None leaves the checkpoint's own setting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from minicpmv.errors import InvalidInputError

# (lowest, highest) for the integer knobs
RANGES = {"max_slice_nums": (1, 64), "max_num_frames": (1, 1024), "stack_frames": (1, 10)}
DOWNSAMPLE_MODES = ("16x", "4x")


def as_flag(name: str, value: Any) -> bool:
    """True/False (also 0/1 and numpy bools); anything else, such as the string "false", is refused."""
    if isinstance(value, (bool, int, np.bool_)) and value in (0, 1):
        return bool(value)
    raise InvalidInputError(f"{name} must be True or False, got {value!r}", param=name)


@dataclass
class ProcessingOptions:
    downsample_mode: str | None = None  # "16x" (default) or "4x": visual tokens per 448x448 unit, 64 or 256
    max_slice_nums: int | None = None  # slices per image (checkpoint default 9; the model card suggests 36)
    use_image_id: bool | None = None  # number each image/video in the prompt
    max_num_frames: int | None = None  # frames sampled from a video (1 fps up to this)
    stack_frames: int | None = None  # 3 or 5: sub-second frames packed into one canvas per second

    def __post_init__(self) -> None:
        if self.downsample_mode is not None and self.downsample_mode not in DOWNSAMPLE_MODES:
            raise InvalidInputError(f"downsample_mode must be '16x' or '4x', got {self.downsample_mode!r}",
                                    param="downsample_mode")
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, np.integer):
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidInputError(f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)
            setattr(self, name, value)
        if self.use_image_id is not None:
            self.use_image_id = as_flag("use_image_id", self.use_image_id)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "") -> ProcessingOptions:
        """From a mapping such as the server's ``mm_processor_kwargs``; unknown keys are refused by name."""
        names = [f.name for f in dataclasses.fields(ProcessingOptions)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise InvalidInputError(f"unknown processing option(s) {unknown}; known: {names}",
                                    param=f"{where}.{unknown[0]}" if where else unknown[0])
        try:
            return ProcessingOptions(**values)
        except InvalidInputError as exc:
            raise InvalidInputError(str(exc), param=f"{where}.{exc.param}" if where else exc.param) from None

    def processing(self) -> ProcessingOptions:
        """Only the processing knobs (a subclass such as the chat options carries more)."""
        return ProcessingOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ProcessingOptions)})
