"""Turn user image inputs into uint8 RGB [3, H, W] tensors, the way the reference processor sees them.

PIL images (and files, which are opened with PIL) with transparency are composited onto white by PIL; numpy RGBA
arrays are composited in float32 and truncated back to uint8, as the reference does for arrays.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from minicpmv.errors import ImageError, InvalidInputError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 megapixels (8192 x 8192)

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, PIL.Image.Image, np.ndarray, BinaryIO]


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height < 1 or width < 1:
        raise ImageError(f"image is empty ({width}x{height} pixels)")
    if height * width > max_pixels:
        raise ImageError(f"image is too large: {width}x{height} = {height * width} pixels, the limit is {max_pixels}")


def _open_bytes(data: bytes, max_pixels: int, what: str) -> PIL.Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            _check_size(image.height, image.width, max_pixels)
            image.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what} is too large to decode safely: the limit is {max_pixels} pixels ({e})") from e
    except ImageError:
        raise
    except PIL.UnidentifiedImageError as e:
        raise ImageError(f"{what} is not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{what} is corrupt or truncated: {e}") from e
    return PIL.ImageOps.exif_transpose(image)


def inline_data(text: str, kind: str, error: type[InvalidInputError]) -> bytes | None:
    """The bytes of a base64 data URL, None for anything else (a path). Remote URLs are refused: fetching is the
    server's job, under its media policy (serve/media.py)."""
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if not header.endswith(";base64"):
            raise error(f"{kind} data URLs must be base64-encoded (data:{kind}/...;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise error(f"{kind} data URL has invalid base64: {e}") from e
    if text.startswith(("http://", "https://")):
        raise error(f"remote {kind} URLs are not fetched here; download it first: {text[:200]}")
    return None


def _read_source(source: str | os.PathLike) -> tuple[bytes, str]:
    text = os.fspath(source)
    data = inline_data(text, "image", ImageError) if isinstance(text, str) else None
    if data is not None:
        return data, "image data URL"
    path = Path(text)
    try:
        return path.read_bytes(), f"image file {str(path)!r}"
    except FileNotFoundError as e:
        raise ImageError(f"image file not found: {str(path)!r}") from e
    except (OSError, ValueError) as e:  # (ValueError: a NUL in the path)
        raise ImageError(f"cannot read image file {str(path)!r}: {e}") from e


def pil_to_rgb(image: PIL.Image.Image) -> torch.Tensor:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(white, rgba)
    try:
        array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot convert a {image.mode!r} image to RGB: {e}") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def array_to_rgb(array: np.ndarray) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"image arrays must be HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}")
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        rgba = image.to(torch.float32).mul_(1.0 / 255)
        rgb, alpha = rgba[:3], rgba[3:]
        # float -> uint8 by scaling with (256 - 1e-3) and truncating, torchvision's `to_dtype(..., scale=True)`
        image = (rgb * alpha + (1 - alpha)).mul(256.0 - 1e-3).to(torch.uint8)
    return image.contiguous()


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Any supported input -> uint8 RGB tensor [3, H, W]. Files and bytes get their EXIF orientation applied."""
    if isinstance(source, PIL.Image.Image):
        _check_size(source.height, source.width, max_pixels)
        return pil_to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.ndim in (2, 3):
            _check_size(source.shape[0], source.shape[1], max_pixels)
        return array_to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return pil_to_rgb(_open_bytes(bytes(source), max_pixels, "image data"))
    if isinstance(source, (str, os.PathLike)):
        data, what = _read_source(source)
        return pil_to_rgb(_open_bytes(data, max_pixels, what))
    if hasattr(source, "read"):  # a file object, as for videos
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("image file objects must be opened in binary mode ('rb')")
        return pil_to_rgb(_open_bytes(bytes(data), max_pixels, "image stream"))
    raise ImageError(f"unsupported image input type {type(source).__name__}")
