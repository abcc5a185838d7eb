"""Image geometry (slicing plan) and pixel pipeline for MiniCPM-V 4.6.

`plan_image` is the single source of truth for sizes: the encoder inputs built here and the placeholder text built in
`prompt.py` both read the same `ImagePlan`, so they can never disagree about token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from minicpmv.errors import InvalidInputError
from minicpmv.processing.image_io import DEFAULT_MAX_PIXELS, ImageInput, load_image

DownsampleMode = Literal["16x", "4x"]
Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class ImageSettings:
    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    downsample_mode: DownsampleMode = "16x"
    slice_mode: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.downsample_mode not in ("16x", "4x"):
            raise InvalidInputError(f"downsample_mode must be '16x' or '4x', got {self.downsample_mode!r}")
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(self.image_std):
            raise InvalidInputError("image_mean and image_std need 3 values each, and std must be non-zero")
        if not self.rescale_factor > 0:
            raise InvalidInputError(f"rescale_factor must be positive, got {self.rescale_factor!r}")

    @property
    def token_divisor(self) -> int:
        """Patches per visual token: 2x2 merge once (4x) or twice (16x)."""
        return 4 if self.downsample_mode == "4x" else 16

    @property
    def size_multiple(self) -> int:
        """Every resized side is a multiple of this many pixels (whole merge windows)."""
        return self.patch_size * (2 if self.downsample_mode == "4x" else 4)

    @classmethod
    def from_config(cls, config: dict, **overrides) -> ImageSettings:
        """Settings from a `preprocessor_config.json`-style dict; unknown keys are ignored."""
        keys = ("max_slice_nums", "scale_resolution", "patch_size", "downsample_mode", "slice_mode", "rescale_factor")
        values = {k: config[k] for k in keys if k in config}
        for k in ("image_mean", "image_std"):
            if k in config:
                values[k] = tuple(float(v) for v in config[k])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class UnitPlan:
    """One encoder input: the downscaled source image or one slice."""

    size: Size  # pixels
    patches: Size  # 14x14 patches
    num_tokens: int


@dataclass(frozen=True)
class ImagePlan:
    image_size: Size
    grid: Size | None  # (rows, cols) of slices, None when the image is not sliced
    refine_size: Size | None  # the whole image is resized to this before being cut into the grid
    units: tuple[UnitPlan, ...]  # source first, then slices row-major
    downsample_mode: DownsampleMode

    @property
    def num_tokens(self) -> int:
        return sum(u.num_tokens for u in self.units)


def _round_to_multiple(length: float, multiple: int) -> int:
    # Python's round() (banker's rounding) on purpose: the reference uses it.
    return max(round(length / multiple) * multiple, multiple)


def _fit_area(height: float, width: float, settings: ImageSettings, allow_upscale: bool) -> Size:
    """Scale to about scale_resolution**2 pixels (keeping the aspect ratio), then snap to merge windows."""
    if height * width > settings.scale_resolution**2 or allow_upscale:
        aspect = width / height
        height = int(settings.scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return _round_to_multiple(height, settings.size_multiple), _round_to_multiple(width, settings.size_multiple)


def _slice_grid(height: int, width: int, settings: ImageSettings) -> Size | None:
    """The (rows, cols) grid whose aspect ratio is closest to the image's; more rows win ties."""
    multiple = min(math.ceil(height * width / settings.scale_resolution**2), settings.max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > settings.max_slice_nums:
            continue
        for rows in range(1, n + 1):
            if n % rows:
                continue
            err = abs(log_ratio - math.log((n // rows) / rows))
            if err < best_err or (err == best_err and rows > best[0]):
                best, best_err = (rows, n // rows), err
    return best


def _unit(size: Size, settings: ImageSettings) -> UnitPlan:
    patches = (size[0] // settings.patch_size, size[1] // settings.patch_size)
    return UnitPlan(size, patches, patches[0] * patches[1] // settings.token_divisor)


def plan_image(height: int, width: int, settings: ImageSettings) -> ImagePlan:
    if height < 1 or width < 1:
        raise InvalidInputError(f"image must have a positive size, got height={height} width={width}")
    grid = _slice_grid(height, width, settings) if settings.slice_mode else None
    source = _unit(_fit_area(height, width, settings, allow_upscale=grid is None), settings)
    if grid is None:
        return ImagePlan((height, width), None, None, (source,), settings.downsample_mode)
    rows, cols = grid
    cell_h = _round_to_multiple(height, rows) / rows
    cell_w = _round_to_multiple(width, cols) / cols
    cell = _unit(_fit_area(cell_h, cell_w, settings, allow_upscale=True), settings)
    refine = (cell.size[0] * rows, cell.size[1] * cols)
    return ImagePlan((height, width), grid, refine, (source,) + (cell,) * (rows * cols), settings.downsample_mode)


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [sum of h*w over units, 3*14*14] float32, raster patch order per unit
    target_sizes: torch.Tensor  # [num_units, 2] int64, (h_patches, w_patches)
    grid: Size | None
    downsample_mode: DownsampleMode
    num_tokens_per_unit: list[int]
    plan: ImagePlan = field(repr=False)


def resize_uint8(image: torch.Tensor, size: Size) -> torch.Tensor:
    """Bicubic antialiased resize of a uint8 [C, H, W] image, done by torch's native uint8 kernel (as torchvision
    does on CPU), so the result is rounded exactly like torchvision's."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=list(size), mode="bicubic", align_corners=False, antialias=True)[0]


def normalize(image: torch.Tensor, settings: ImageSettings) -> torch.Tensor:
    # Rescale and normalise fused as (x - mean/r) / (std/r) in float32, the order the reference computes in.
    mean = torch.tensor(settings.image_mean, dtype=torch.float32) * (1.0 / settings.rescale_factor)
    std = torch.tensor(settings.image_std, dtype=torch.float32) * (1.0 / settings.rescale_factor)
    return (image.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def patchify(unit: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[C, H, W] -> [h*w, C*p*p], patches in raster order, each flattened as (c, py, px)."""
    c, height, width = unit.shape
    h, w = height // patch_size, width // patch_size
    x = unit.reshape(c, h, patch_size, w, patch_size).permute(1, 3, 0, 2, 4)
    return x.reshape(h * w, c * patch_size * patch_size)


def _cut_units(image: torch.Tensor, plan: ImagePlan) -> list[torch.Tensor]:
    units = [resize_uint8(image, plan.units[0].size)]
    if plan.grid is not None:
        refined = resize_uint8(image, plan.refine_size)
        (rows, cols), (sh, sw) = plan.grid, plan.units[1].size
        units += [refined[:, r * sh : (r + 1) * sh, c * sw : (c + 1) * sw] for r in range(rows) for c in range(cols)]
    return units


def process_image(image: ImageInput, settings: ImageSettings | None = None) -> ProcessedImage:
    settings = settings or ImageSettings()
    pixels = load_image(image, max_pixels=settings.max_pixels)
    plan = plan_image(int(pixels.shape[1]), int(pixels.shape[2]), settings)
    units = [patchify(normalize(u, settings), settings.patch_size) for u in _cut_units(pixels, plan)]
    return ProcessedImage(
        pixel_values=torch.cat(units),
        target_sizes=torch.tensor([u.patches for u in plan.units], dtype=torch.int64),
        grid=plan.grid,
        downsample_mode=settings.downsample_mode,
        num_tokens_per_unit=[u.num_tokens for u in plan.units],
        plan=plan,
    )
