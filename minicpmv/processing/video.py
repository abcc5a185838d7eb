"""Video input for MiniCPM-V 4.6: open with PyAV, pick frames, stack sub-second frames, run each unit through the
image pipeline.

A video becomes a sequence of *visual units*. Each unit is one main frame, or (with ``stack_frames`` N > 1) one
canvas showing the N-1 sub-frames of one second side by side. Every unit is then treated as an image:
`process_image` with the video's `ImageSettings`. There is no second geometry here; units are planned by
`plan_image`, exactly as images are.

Memory: frames are decoded one after another. Only the chosen frames are converted to RGB, and each unit is
turned into its encoder patches as soon as all of its frames have been decoded, after which its RGB frames are
dropped. Peak memory is therefore the output tensor, allocated once, plus the RGB frames of the units still
incomplete (one frame, or one second's sub-frames) plus the decoder's own buffers. It never holds all sampled
frames at once.

Frame choice follows `MiniCPMV4_6VideoProcessor.sample_frames` (see SPEC section 6):
- duration <= max_num_frames seconds: one frame per second, index ``int(i * fps)``;
- longer: an index every 0.1 s, thinned to ``max_num_frames`` by ``np.linspace(..., dtype=int)``;
- stack_frames N > 1: frames at ``sec + j/N`` (j = 1..N-1, kept if before the end), thinned to
  ``max_num_frames * (N-1)``, grouped by second; unit order is ``[main_0, stack_0, main_1, stack_1, ...]``,
  where stack_i holds the sub-frames of *second* i (the reference pairs by position, also for long videos).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Union

import numpy as np
import torch

from minicpmv.errors import VideoError
from minicpmv.processing.image import DownsampleMode, ImagePlan, ImageSettings, plan_image, process_image
from minicpmv.processing.image_io import inline_data

VideoInput = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]

STACK_GAP = 6  # black pixels between the frames of a stacked canvas


@dataclass(frozen=True)
class VideoSettings:
    """How a video is sampled (``max_num_frames``, ``stack_frames``) and how each unit is processed (``image``)."""

    image: ImageSettings = field(default_factory=ImageSettings)
    max_num_frames: int = 128
    stack_frames: int = 1

    def __post_init__(self) -> None:
        for name in ("max_num_frames", "stack_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VideoError(f"{name} must be a positive integer, got {value!r}")

    @property
    def downsample_mode(self) -> DownsampleMode:
        return self.image.downsample_mode

    @classmethod
    def from_config(cls, config: dict, **overrides) -> VideoSettings:
        """Settings from a `processor_config.json` ``video_processor``-style dict; unknown keys are ignored.
        ``overrides`` (None values ignored) may name any `ImageSettings` field, ``max_num_frames`` or
        ``stack_frames``."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        own = {k: config[k] for k in ("max_num_frames", "stack_frames") if k in config}
        own.update({k: overrides.pop(k) for k in ("max_num_frames", "stack_frames") if k in overrides})
        return cls(image=ImageSettings.from_config(config, **overrides), **own)

    def replace(self, **overrides) -> VideoSettings:
        """A copy with the non-None ``overrides`` applied (image fields included)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        own = {k: overrides.pop(k) for k in ("max_num_frames", "stack_frames") if k in overrides}
        image = dataclasses.replace(self.image, **overrides) if overrides else self.image
        return dataclasses.replace(self, image=image, **own)


@dataclass(frozen=True)
class VideoMetadata:
    fps: float  # average frame rate
    duration: float  # seconds
    total_frames: int  # frames in the stream (header count, or counted by demuxing when the header has none)
    width: int
    height: int
    codec: str
    container: str


@dataclass(frozen=True)
class FrameSample:
    """The frames `sample_frames` picks: ``main`` (one per unit) and the stacked ``sub`` frames with their second."""

    main: tuple[int, ...]
    sub: tuple[int, ...] = ()
    sub_seconds: tuple[int, ...] = ()

    @property
    def indices(self) -> tuple[int, ...]:
        """All chosen indices in the reference's order: main frames, then sub-frames."""
        return self.main + self.sub


@dataclass(frozen=True)
class VideoUnit:
    """One encoder image made from the video: a main frame, or a canvas of one second's sub-frames."""

    frames: tuple[int, ...]  # frame indices shown, row-major on the canvas
    stacked: bool
    layout: tuple[int, int]  # (rows, cols) of the canvas; (1, 1) for a main frame
    size: tuple[int, int]  # (height, width) of the image handed to the image pipeline


@dataclass
class ProcessedVideo:
    pixel_values: torch.Tensor  # [sum of h*w over all encoder units, 3*14*14] float32, like ProcessedImage
    target_sizes: torch.Tensor  # [encoder units, 2] int64 (h_patches, w_patches); a unit's source, then its slices
    downsample_mode: DownsampleMode
    num_tokens: int  # placeholder tokens of the whole video
    num_tokens_per_unit: list[int]  # per encoder unit (row of target_sizes), like ProcessedImage
    plans: tuple[ImagePlan, ...]  # one per visual unit, in prompt order
    units: tuple[VideoUnit, ...]  # one per visual unit, in prompt order
    frame_indices: tuple[int, ...]  # sampled indices in the reference's order (main frames, then sub-frames)
    metadata: VideoMetadata


# -- opening ------------------------------------------------------------------------------------------------------


class _Source:
    """A video input that can be opened more than once (the header may lack a frame count, which is then counted in
    a first pass)."""

    def __init__(self, video: VideoInput):
        self.path: str | None = None
        self.data: bytes | None = None
        self.file = None
        if isinstance(video, (bytes, bytearray, memoryview)):
            self.data, self.what = bytes(video), "video data"
        elif isinstance(video, (str, os.PathLike)):
            text = os.fspath(video)
            if isinstance(text, bytes):
                text = os.fsdecode(text)
            self.data = inline_data(text, "video", VideoError)
            if self.data is not None:
                self.what = "video data URL"
            else:
                if not Path(text).is_file():
                    raise VideoError(f"video file not found: {text!r}")
                self.path, self.what = text, f"video file {text!r}"
        elif hasattr(video, "read"):
            self.what = "video stream"
            seekable = getattr(video, "seekable", None)
            if isinstance(video, io.TextIOBase):
                raise VideoError("video file objects must be opened in binary mode ('rb')")
            if callable(seekable) and seekable():
                self.file, self.start = video, video.tell()
            else:
                self.data = video.read()
                if not isinstance(self.data, (bytes, bytearray)):
                    raise VideoError("video file objects must be opened in binary mode")
                self.data = bytes(self.data)
        else:
            raise VideoError(f"unsupported video input type {type(video).__name__}")
        if self.data is not None and not self.data:
            raise VideoError(f"{self.what} is empty")

    def open(self):
        import av

        if self.path is not None:
            target = self.path
        elif self.data is not None:
            target = io.BytesIO(self.data)
        else:
            self.file.seek(self.start)
            target = self.file
        try:
            return av.open(target, mode="r")
        except av.error.FFmpegError as e:
            raise VideoError(f"{self.what} is not a readable video (corrupt or unknown format): {e}") from e


def _positive(value) -> float | None:
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _video_stream(container, what: str):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        found = f" (it has only {', '.join(kinds)} streams)" if kinds else ""
        raise VideoError(f"{what} has no video stream{found}")
    return container.streams.video[0]


def _count_packets(source: _Source) -> tuple[int, float | None]:
    """(number of video packets, end time in seconds or None), by demuxing without decoding."""
    import av

    count, end = 0, None
    resume = source.file.tell() if source.file is not None else None  # the caller's container reads the same file
    container = source.open()
    try:
        stream = _video_stream(container, source.what)
        base = stream.time_base
        first = None
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's flush packet
                continue
            count += 1
            if packet.pts is not None and base:
                start = packet.pts * base
                first = start if first is None else min(first, start)
                stop = start + (packet.duration or 0) * base
                end = stop if end is None else max(end, stop)
        if end is not None and first is not None:
            end = float(end - first)
    except av.error.FFmpegError as e:
        raise VideoError(f"{source.what} is corrupt: {e}") from e
    finally:
        container.close()
        if resume is not None:
            source.file.seek(resume)
    return count, end


def _read_metadata(container, source: _Source) -> VideoMetadata:
    stream = _video_stream(container, source.what)
    fps = _positive(stream.average_rate) or _positive(stream.guessed_rate) or _positive(stream.base_rate)
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = _positive(Fraction(stream.duration) * stream.time_base)
    if duration is None and container.duration is not None:
        duration = _positive(container.duration / 1_000_000)  # container durations are in AV_TIME_BASE units
    frames = stream.frames if stream.frames and stream.frames > 0 else None
    if frames is None:
        frames, end = _count_packets(source)
        duration = duration or _positive(end)
    if not frames:
        raise VideoError(f"{source.what} has no video frames")
    if duration is None and fps is not None:
        duration = frames / fps
    if duration is not None and (fps is None or abs(fps * duration - frames) > max(2.0, 0.02 * frames)):
        # No rate, or a nominal one the stream does not keep (variable frame rate in Matroska, say): use the
        # true average, so that one frame per second stays inside the stream.
        fps = frames / duration
    if duration is None or fps is None:
        raise VideoError(f"{source.what} has neither a usable duration nor a frame rate")
    codec = stream.codec_context.name if stream.codec_context is not None else "unknown"
    return VideoMetadata(
        fps=fps,
        duration=duration,
        total_frames=int(frames),
        width=int(stream.width or 0),
        height=int(stream.height or 0),
        codec=codec,
        container=container.format.name,
    )


def probe_video(video: VideoInput) -> VideoMetadata:
    """The metadata `process_video` samples from (no frames are decoded)."""
    source = _Source(video)
    container = source.open()
    try:
        return _read_metadata(container, source)
    finally:
        container.close()


# -- sampling and stacking ----------------------------------------------------------------------------------------


def sample_frames(metadata: VideoMetadata, max_num_frames: int = 128, stack_frames: int = 1) -> FrameSample:
    """The frame indices the reference's `sample_frames` picks for this metadata (indices are clamped to the last
    frame; the reference clamps all but the 1 fps main frames, which are in range whenever the metadata is
    consistent)."""
    fps, duration, last = metadata.fps, metadata.duration, metadata.total_frames - 1
    seconds = math.ceil(duration)
    if duration > max_num_frames:
        main = [min(int(round(i * 0.1, 1) * fps), last) for i in range(int(duration / 0.1))]
        if len(main) > max_num_frames:
            main = [main[i] for i in np.linspace(0, len(main) - 1, max_num_frames, dtype=int)]
    else:
        main = [min(int(i * fps), last) for i in range(seconds)]
    sub: list[int] = []
    sub_seconds: list[int] = []
    if stack_frames > 1:
        for sec in range(seconds):
            for j in range(1, stack_frames):
                timestamp = sec + j / stack_frames
                if timestamp < duration:
                    sub.append(min(int(timestamp * fps), last))
                    sub_seconds.append(sec)
        cap = max_num_frames * (stack_frames - 1)
        if len(sub) > cap:
            keep = np.linspace(0, len(sub) - 1, cap, dtype=int)
            sub, sub_seconds = [sub[i] for i in keep], [sub_seconds[i] for i in keep]
    return FrameSample(tuple(main), tuple(sub), tuple(sub_seconds))


def stack_layout(count: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of a canvas of ``count`` frames: 2x2 for four; for three or two, whichever arrangement has the
    aspect ratio closest to 1 (three: 1 row on a tie; two: by the frame's own aspect on a tie); otherwise one row."""

    def off_square(rows: int, cols: int) -> float:
        canvas_w = cols * width + (cols - 1) * STACK_GAP
        canvas_h = rows * height + (rows - 1) * STACK_GAP
        return abs(canvas_w / max(1, canvas_h) - 1.0)

    if count == 4:
        return 2, 2
    if count == 3:
        return (1, 3) if off_square(1, 3) <= off_square(3, 1) else (3, 1)
    if count == 2:
        wide, tall = off_square(1, 2), off_square(2, 1)
        if wide == tall:
            return (1, 2) if width >= height else (2, 1)
        return (1, 2) if wide < tall else (2, 1)
    return 1, count


def _canvas_size(layout: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    rows, cols = layout
    return rows * height + (rows - 1) * STACK_GAP, cols * width + (cols - 1) * STACK_GAP


def stack_canvas(frames: list[np.ndarray]) -> np.ndarray:
    """Frames (uint8 [H, W, 3], all the same size) placed row-major on a black canvas with 6 px gaps."""
    height, width = frames[0].shape[:2]
    layout = stack_layout(len(frames), height, width)
    canvas = np.zeros((*_canvas_size(layout, height, width), 3), dtype=np.uint8)
    for k, frame in enumerate(frames):
        top, left = (k // layout[1]) * (height + STACK_GAP), (k % layout[1]) * (width + STACK_GAP)
        canvas[top : top + height, left : left + width] = frame
    return canvas


def plan_units(sample: FrameSample, height: int, width: int) -> list[VideoUnit]:
    """Units in prompt order: each main frame, followed by the canvas of the same-numbered second if it has one."""
    by_second: dict[int, list[int]] = {}
    for index, second in zip(sample.sub, sample.sub_seconds):
        by_second.setdefault(second, []).append(index)
    units = []
    for position, index in enumerate(sample.main):
        units.append(VideoUnit((index,), False, (1, 1), (height, width)))
        if position in by_second:
            frames = tuple(by_second[position])
            layout = stack_layout(len(frames), height, width)
            units.append(VideoUnit(frames, True, layout, _canvas_size(layout, height, width)))
    return units


# -- decoding -----------------------------------------------------------------------------------------------------


def _check_pixels(height: int, width: int, settings: VideoSettings, what: str) -> None:
    if height * width > settings.image.max_pixels:
        raise VideoError(
            f"{what} is too large: {width}x{height} = {height * width} pixels, the limit is {settings.image.max_pixels}"
        )


class _Assembler:
    """Collects the RGB frames of each unit as they are decoded, and turns every completed unit into patches
    written straight into the preallocated output."""

    def __init__(self, sample: FrameSample, height: int, width: int, settings: VideoSettings, what: str):
        _check_pixels(height, width, settings, f"{what}'s frame size")
        self.settings, self.size = settings, (height, width)
        self.units = plan_units(sample, height, width)
        for unit in self.units:
            _check_pixels(*unit.size, settings, f"{what}'s stacked canvas")
        self.plans = [plan_image(*unit.size, settings.image) for unit in self.units]
        lengths = [sum(u.patches[0] * u.patches[1] for u in plan.units) for plan in self.plans]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        channels = 3 * settings.image.patch_size**2
        self.pixel_values = torch.empty(self.offsets[-1], channels, dtype=torch.float32)
        self.pending: list[list[np.ndarray | None]] = [[None] * len(unit.frames) for unit in self.units]
        self.missing = [len(unit.frames) for unit in self.units]
        self.wanted: dict[int, list[tuple[int, int]]] = {}  # frame index -> (unit, slot) pairs
        for u, unit in enumerate(self.units):
            for slot, index in enumerate(unit.frames):
                self.wanted.setdefault(index, []).append((u, slot))
        self.last_index = max(self.wanted)

    def add(self, index: int, rgb: np.ndarray) -> None:
        if rgb.shape[:2] != self.size:
            raise VideoError(
                f"the frame size changes mid-stream ({self.size[1]}x{self.size[0]} -> {rgb.shape[1]}x{rgb.shape[0]}), "
                "which is not supported"
            )
        for u, slot in self.wanted.pop(index, ()):
            self.pending[u][slot] = rgb
            self.missing[u] -= 1
            if not self.missing[u]:
                self._finish(u)

    def _finish(self, u: int) -> None:
        frames, self.pending[u] = self.pending[u], []
        image = stack_canvas(frames) if self.units[u].stacked else frames[0]
        processed = process_image(image, self.settings.image)
        if processed.plan != self.plans[u]:  # cannot happen: both come from plan_image on the same size
            raise AssertionError(f"unit {u}: plan mismatch")
        self.pixel_values[self.offsets[u] : self.offsets[u + 1]] = processed.pixel_values


def _to_rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def process_video(video: VideoInput, settings: VideoSettings | None = None) -> ProcessedVideo:
    """Decode ``video`` once, sample its frames like the reference, and return every unit's encoder inputs."""
    import av

    settings = settings or VideoSettings()
    source = _Source(video)
    container = source.open()
    try:
        metadata = _read_metadata(container, source)
        if metadata.width and metadata.height:
            _check_pixels(metadata.height, metadata.width, settings, f"{source.what}'s frame size")
        sample = sample_frames(metadata, settings.max_num_frames, settings.stack_frames)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        assembler, last, decoded = None, None, 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded, last = index + 1, frame
                if assembler is None:
                    assembler = _Assembler(sample, frame.height, frame.width, settings, source.what)
                if index in assembler.wanted:
                    assembler.add(index, _to_rgb(frame))
                if index >= assembler.last_index:
                    break
        except av.error.FFmpegError as e:
            raise VideoError(f"{source.what} is corrupt: decoding failed after {decoded} frame(s): {e}") from e
        if assembler is None:
            raise VideoError(f"{source.what} has no decodable video frames")
        if assembler.wanted:  # the stream ended before the header's frame count: use its last frame
            rgb = _to_rgb(last)
            for index in sorted(assembler.wanted):
                assembler.add(index, rgb)
    finally:
        container.close()

    plans = tuple(assembler.plans)
    per_unit = [u.num_tokens for plan in plans for u in plan.units]
    return ProcessedVideo(
        pixel_values=assembler.pixel_values,
        target_sizes=torch.tensor([u.patches for plan in plans for u in plan.units], dtype=torch.int64),
        downsample_mode=settings.downsample_mode,
        num_tokens=sum(per_unit),
        num_tokens_per_unit=per_unit,
        plans=plans,
        units=tuple(assembler.units),
        frame_indices=sample.indices,
        metadata=metadata,
    )
