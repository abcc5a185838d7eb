"""Our image pipeline against transformers' MiniCPMV4_6ImageProcessor (torchvision backend)."""

from __future__ import annotations

import functools
import io

import numpy as np
import PIL.Image
import pytest
import torch

from minicpmv.errors import ImageError, InvalidInputError, MiniCPMVError
from minicpmv.processing.image import ImageSettings, plan_image, process_image

SIZES_WH = [
    (448, 448), (224, 224), (200, 100), (1084, 820), (365, 211),
    (153, 174), (1920, 1080), (3136, 3136), (4000, 60), (60, 4000),
]  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    from transformers import MiniCPMV4_6ImageProcessor
    from transformers.image_processing_backends import TorchvisionBackend

    processor = MiniCPMV4_6ImageProcessor()
    assert isinstance(processor, TorchvisionBackend) and processor.backend == "torchvision"
    return processor


@functools.cache
def _synthetic(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (np.arange(width, dtype=np.int16) * 255 // max(width - 1, 1))[None, :]
    y = (np.arange(height, dtype=np.int16) * 255 // max(height - 1, 1))[:, None]
    base = np.stack(np.broadcast_arrays(x, y, (x + y) % 256), axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3), dtype=np.int16)
    image = np.clip(base + noise, 0, 255).astype(np.uint8)
    image.flags.writeable = False
    return image


def synthetic(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Noise over a gradient: smooth regions and edges both exercise the resampling filter."""
    return _synthetic(width, height, seed).copy()


def to_our_layout(reference_pixels: torch.Tensor) -> torch.Tensor:
    """Reference [1, 3, 14, L*14] -> ours [L, 3*14*14]."""
    length = reference_pixels.shape[-1] // 14
    return reference_pixels.reshape(3, 14, length, 14).permute(2, 0, 1, 3).reshape(length, 588)


def assert_matches_reference(reference, image, settings: ImageSettings, reference_input=None):
    ours = process_image(image, settings)
    ref = reference(
        reference_input if reference_input is not None else image,
        downsample_mode=settings.downsample_mode,
        max_slice_nums=settings.max_slice_nums,
        slice_mode=settings.slice_mode,
        return_tensors="pt",
    )
    assert ours.target_sizes.dtype == torch.int64
    assert ours.target_sizes.tolist() == ref["target_sizes"].tolist()
    assert list(ours.grid or (0, 0)) == list(ref["grids"][0])
    divisor = 4 if settings.downsample_mode == "4x" else 16
    assert ours.num_tokens_per_unit == (ref["target_sizes"].prod(-1) // divisor).tolist()
    expected = to_our_layout(ref["pixel_values"])
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_values.shape == expected.shape
    assert (ours.pixel_values - expected).abs().max().item() <= 1e-6
    return ours


@pytest.mark.parametrize("max_slice_nums", [1, 9, 36])
@pytest.mark.parametrize("mode", ["16x", "4x"])
@pytest.mark.parametrize("width,height", SIZES_WH)
def test_pixels_and_geometry_match_reference(reference, width, height, mode, max_slice_nums):
    image = PIL.Image.fromarray(synthetic(width, height))
    settings = ImageSettings(downsample_mode=mode, max_slice_nums=max_slice_nums)
    ours = assert_matches_reference(reference, image, settings)

    plan = plan_image(height, width, settings)
    assert plan == ours.plan and plan.image_size == (height, width)
    assert [list(u.patches) for u in plan.units] == ours.target_sizes.tolist()
    assert sum(h * w for h, w in ours.target_sizes.tolist()) == ours.pixel_values.shape[0]
    for unit in plan.units:
        assert unit.size == (unit.patches[0] * 14, unit.patches[1] * 14)
        assert unit.size[0] % settings.size_multiple == 0 and unit.size[1] % settings.size_multiple == 0
    if plan.grid is not None:
        assert len(plan.units) == 1 + plan.grid[0] * plan.grid[1]


def test_patch_layout_is_channel_major_raster():
    image = synthetic(448, 448)
    ours = process_image(image, ImageSettings())
    normalised = (torch.from_numpy(image).permute(2, 0, 1).float() - 127.5) / 127.5
    # 448x448 needs no resize; patch (row 1, col 2) starts at pixel (14, 28).
    patch = ours.pixel_values[1 * 32 + 2].reshape(3, 14, 14)
    assert torch.equal(patch, normalised[:, 14:28, 28:42])


def test_slice_mode_off_matches_reference(reference):
    image = PIL.Image.fromarray(synthetic(1920, 1080))
    ours = assert_matches_reference(reference, image, ImageSettings(slice_mode=False))
    assert ours.grid is None and len(ours.num_tokens_per_unit) == 1


def _rgba(width=300, height=200) -> np.ndarray:
    alpha = np.random.default_rng(1).integers(0, 256, (height, width, 1), dtype=np.uint8)
    return np.concatenate([synthetic(width, height), alpha], axis=-1)


def _pil_modes() -> dict[str, PIL.Image.Image]:
    rgb = PIL.Image.fromarray(synthetic(300, 200))
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 7
    grey16 = (synthetic(300, 200)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    return {
        "RGBA": PIL.Image.fromarray(_rgba()),
        "LA": PIL.Image.fromarray(_rgba()).convert("LA"),
        "P": rgb.convert("P"),
        "P-transparency": palette_transparent,
        "CMYK": rgb.convert("CMYK"),
        "I;16": PIL.Image.fromarray(grey16),
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
    }


PIL_MODES = ["RGBA", "LA", "P", "P-transparency", "CMYK", "I;16", "L", "1"]


@pytest.mark.parametrize("mode", PIL_MODES)
def test_pil_modes_match_reference(reference, mode):
    image = _pil_modes()[mode]
    assert image.mode == mode.split("-")[0]
    assert_matches_reference(reference, image, ImageSettings())


@pytest.mark.parametrize(
    "array",
    [synthetic(300, 200), synthetic(300, 200)[..., 0], synthetic(300, 200)[..., :1], _rgba()],
    ids=["HWC-RGB", "HW-grey", "HW1-grey", "HWC-RGBA"],
)
def test_numpy_inputs_match_reference(reference, array):
    # The reference rejects 2-D arrays; an H x W x 1 array is the same image to it.
    reference_input = array if array.ndim == 3 else array[..., None]
    assert_matches_reference(reference, array, ImageSettings(), reference_input=reference_input)


def _encoded(image: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_bytes_match_reference_on_the_decoded_image(reference):
    data = _encoded(PIL.Image.fromarray(_rgba(500, 500)), "PNG")
    assert_matches_reference(reference, data, ImageSettings(), reference_input=PIL.Image.open(io.BytesIO(data)))
    from_file = process_image(io.BytesIO(data))  # a binary file object reads like its bytes
    assert torch.equal(from_file.pixel_values, process_image(data).pixel_values)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # the reference decodes with torchvision
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_path_and_exif_orientation_match_reference(reference, tmp_path, fmt):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored 700x300 image is shown as 300x700
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_encoded(PIL.Image.fromarray(synthetic(700, 300)), fmt, exif=exif.tobytes()))
    ours = assert_matches_reference(reference, path, ImageSettings(), reference_input=str(path))
    assert ours.plan.image_size == (700, 300)
    assert torch.equal(process_image(str(path)).pixel_values, ours.pixel_values)


def test_data_url_equals_bytes():
    import base64

    data = _encoded(PIL.Image.fromarray(synthetic(320, 240)), "PNG")
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert torch.equal(process_image(url).pixel_values, process_image(data).pixel_values)


def _truncated_png() -> bytes:
    data = _encoded(PIL.Image.fromarray(synthetic(300, 300)), "PNG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "bad,message",
    [
        (b"definitely not an image", "not a recognised image"),
        (_truncated_png(), "corrupt or truncated"),
        (PIL.Image.new("RGB", (0, 10)), "empty"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
        (np.zeros((5, 5, 3), dtype=np.float32), "uint8"),
        (np.zeros((5, 5, 2), dtype=np.uint8), "shape"),
        ("/nonexistent/image.png", "not found"),
        ("https://example.com/cat.png", "remote"),
        ("data:image/png;base64,@@@", "base64"),
        (12345, "unsupported"),
        (io.StringIO("text"), "binary mode"),
    ],
    ids=["garbage", "truncated", "zero-pil", "zero-numpy", "float", "two-channels", "missing", "url", "bad-b64", "int",
         "text-file"],
)
def test_bad_images_raise_image_error(bad, message):
    with pytest.raises(ImageError, match=message) as info:
        process_image(bad)
    assert isinstance(info.value, InvalidInputError) and isinstance(info.value, ValueError)
    assert isinstance(info.value, MiniCPMVError)


@pytest.mark.parametrize("kind", ["pil", "numpy", "bytes"])
def test_pixel_limit(kind):
    array = synthetic(200, 100)
    image = {"pil": PIL.Image.fromarray(array), "numpy": array, "bytes": _encoded(PIL.Image.fromarray(array), "PNG")}
    with pytest.raises(ImageError, match="too large.*20000 pixels.*limit is 19999"):
        process_image(image[kind], ImageSettings(max_pixels=19_999))
    assert process_image(image[kind], ImageSettings(max_pixels=20_000)).plan.image_size == (100, 200)


def test_pil_decompression_bomb_becomes_image_error(monkeypatch):
    data = _encoded(PIL.Image.fromarray(synthetic(200, 100)), "PNG")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 5_000)  # PIL warns above this and refuses above twice this
    with pytest.raises(ImageError, match="too large to decode safely: the limit is"):
        process_image(data)


@pytest.mark.parametrize(
    "settings",
    [
        dict(downsample_mode="8x"),
        dict(max_slice_nums=0),
        dict(patch_size=0),
        dict(max_pixels=-1),
        dict(image_std=(0, 1, 1)),
    ],
)
def test_bad_settings_raise(settings):
    with pytest.raises(InvalidInputError, match=next(iter(settings)).split("_")[0]):
        ImageSettings(**settings)


def test_plan_rejects_empty_size():
    with pytest.raises(InvalidInputError, match="positive size"):
        plan_image(0, 10, ImageSettings())


def test_settings_from_checkpoint_config():
    import json
    from importlib import resources

    config = json.loads((resources.files("minicpmv") / "assets" / "processor_config.json").read_text())
    settings = ImageSettings.from_config(config["image_processor"], downsample_mode="4x")
    assert settings == ImageSettings(downsample_mode="4x", rescale_factor=config["image_processor"]["rescale_factor"])


def test_a_path_with_a_nul_byte_is_an_image_error():
    from minicpmv.processing.image_io import load_image

    with pytest.raises(ImageError, match="cannot read image file"):
        load_image("photo\x00.png")
