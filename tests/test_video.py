"""Video input against transformers' MiniCPMV4_6VideoProcessor / MiniCPMV4_6Processor.

Clips are written with PyAV into a temporary directory. The reference is handed every frame of the clip (decoded
with PyAV, tests/tiny.py) plus the metadata our decoder read, with ``do_sample_frames=True``, so both sides sample from the
same facts; the comparison then checks the chosen indices, pixels, patch grids and token ids.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from minicpmv.checkpoint import load_model
from minicpmv.errors import InvalidInputError, VideoError
from minicpmv.processing import video as video_module
from minicpmv.processing.image import ImageSettings
from minicpmv.processing.video import (
    VideoSettings,
    probe_video,
    process_video,
    stack_canvas,
    stack_layout,
)
from tests.tiny import (
    REAL,
    all_frames,
    image,
    reference_checkpoint,
    reference_metadata,
    to_patches,
    user,
    video_frame,
    write_clip,
)

PAD = "<|video_pad|>"


def irregular_pts(count: int, seed: int = 1) -> list[int]:
    steps = np.random.default_rng(seed).choice([15, 40, 90, 160], size=count)
    return np.cumsum(steps).tolist()


# name -> (codec, width, height, fps, frames, pix_fmt, pts)
CLIPS = {
    "h264.mp4": ("libx264", 96, 64, 10, 35, "yuv420p", None),  # 3.5 s
    "mpeg4.avi": ("mpeg4", 80, 60, 8, 19, "yuv420p", None),  # 2.375 s
    "vp8.webm": ("libvpx", 64, 48, 6, 15, "yuv420p", None),  # no frame count in the header
    "mjpeg-odd.avi": ("mjpeg", 161, 97, 5, 14, "yuvj444p", None),
    "h264-odd.mp4": ("libx264", 161, 97, 7, 12, "yuv444p", None),
    "vfr.mp4": ("libx264", 64, 48, 25, 30, "yuv420p", irregular_pts(30)),
    "vfr.mkv": ("libx264", 64, 48, 25, 30, "yuv420p", irregular_pts(30, seed=2)),  # no frame count either
    "sliced.mp4": ("libx264", 640, 360, 2, 5, "yuv420p", None),  # frames big enough to be sliced
    "long.mp4": ("mpeg4", 32, 32, 2, 262, "yuv420p", None),  # 131 s > 128 s: the uniform long-video sampling
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("clips")
    for name, (codec, *args) in CLIPS.items():
        write_clip(directory / name, codec, *args)
    return {name: directory / name for name in CLIPS}


def reference_video(path, ours, **kwargs):
    from transformers import MiniCPMV4_6VideoProcessor

    out = MiniCPMV4_6VideoProcessor()(
        videos=[all_frames(path)],
        video_metadata=[reference_metadata(ours)],
        do_sample_frames=True,
        return_metadata=True,
        return_tensors="pt",
        **kwargs,
    )
    return out


def assert_same_as_reference(ours, expected):
    assert list(ours.frame_indices) == list(expected["video_metadata"][0].frames_indices)
    assert ours.target_sizes.tolist() == expected["target_sizes_videos"].tolist()
    pixels = to_patches(expected["pixel_values_videos"])
    assert ours.pixel_values.shape == pixels.shape
    assert (ours.pixel_values - pixels).abs().max().item() <= 1e-6
    divisor = 16 if ours.downsample_mode == "16x" else 4
    assert ours.num_tokens == sum(int(h * w) // divisor for h, w in ours.target_sizes)


# -- frames and pixels ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["16x", "4x"])
@pytest.mark.parametrize("stack", [1, 3, 5])
@pytest.mark.parametrize("name", list(CLIPS))
def test_frames_and_pixels_match_reference(clips, name, stack, mode):
    options = dict(stack_frames=stack, downsample_mode=mode)
    if name == "long.mp4" and (stack, mode) != (1, "16x"):
        # 128-256 units, each upscaled to ~448x448, are slow on 2 cores: shrink the units, keep the sampling.
        options["scale_resolution"] = 112
    ours = process_video(clips[name], VideoSettings().replace(**options))
    expected = reference_video(clips[name], ours, **options)
    assert_same_as_reference(ours, expected)
    if name == "long.mp4":
        assert ours.metadata.duration > 128 and len(ours.units) >= 128
        assert sum(not u.stacked for u in ours.units) == 128
    if stack > 1:
        assert any(u.stacked for u in ours.units)


@pytest.mark.parametrize("stack", [1, 2, 3, 5])
@pytest.mark.parametrize("max_num_frames", [1, 2, 3])
@pytest.mark.parametrize("name", ["h264.mp4", "vfr.mp4", "mjpeg-odd.avi"])
def test_long_video_rule_with_few_frames_matches_reference(clips, name, max_num_frames, stack):
    # A clip longer than max_num_frames seconds takes the long-video path; sub-frames are then thinned and still
    # paired with main frames by position.
    settings = VideoSettings(max_num_frames=max_num_frames, stack_frames=stack)
    ours = process_video(clips[name], settings)
    expected = reference_video(clips[name], ours, stack_frames=stack, max_num_frames=max_num_frames)
    assert_same_as_reference(ours, expected)


def test_metadata_of_each_container(clips):
    h264 = probe_video(clips["h264.mp4"])
    assert (h264.fps, h264.duration, h264.total_frames) == (10.0, 3.5, 35)
    assert (h264.width, h264.height, h264.codec) == (96, 64, "h264")
    webm = probe_video(clips["vp8.webm"])  # the header has no frame count: counted by demuxing
    assert (webm.total_frames, webm.fps) == (15, 6.0) and webm.duration == pytest.approx(2.5, abs=0.01)
    vfr = probe_video(clips["vfr.mkv"])  # nominal 25 fps, but 30 frames in 2.21 s: the true average is used
    assert vfr.total_frames == 30 and vfr.fps == pytest.approx(30 / 2.21)
    odd = probe_video(clips["mjpeg-odd.avi"])
    assert (odd.width, odd.height, odd.total_frames) == (161, 97, 14)
    assert probe_video(clips["long.mp4"]).duration == pytest.approx(131)


def test_units_interleave_main_frames_and_stacks(clips):
    ours = process_video(clips["h264.mp4"], VideoSettings(stack_frames=3))  # 3.5 s at 10 fps
    assert ours.frame_indices == (0, 10, 20, 30, 3, 6, 13, 16, 23, 26, 33)
    assert [u.frames for u in ours.units] == [(0,), (3, 6), (10,), (13, 16), (20,), (23, 26), (30,), (33,)]
    assert [u.stacked for u in ours.units] == [False, True] * 3 + [False, True]
    assert ours.units[1].layout == (2, 1)  # 96x64 frames: two stacked vertically are closer to square
    assert len(ours.plans) == len(ours.units) and ours.num_tokens == sum(p.num_tokens for p in ours.plans)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("size", [(64, 96), (96, 64), (50, 50), (97, 161), (20, 200)])
def test_stack_canvas_matches_reference(count, size):
    from transformers import MiniCPMV4_6VideoProcessor

    frames = [video_frame(i, *size) for i in range(count)]
    stacked = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    expected = MiniCPMV4_6VideoProcessor().concat_frames_as_image(stacked)
    canvas = stack_canvas(frames)
    assert canvas.shape == tuple(expected[0].permute(1, 2, 0).shape)
    assert (torch.from_numpy(canvas) == expected[0].permute(1, 2, 0)).all()
    rows, cols = stack_layout(count, *size)
    assert canvas.shape[:2] == (rows * size[0] + 6 * (rows - 1), cols * size[1] + 6 * (cols - 1))


def test_only_the_chosen_frames_are_converted(clips, monkeypatch):
    converted = []
    original = video_module._to_rgb
    monkeypatch.setattr(video_module, "_to_rgb", lambda frame: converted.append(1) or original(frame))
    ours = process_video(clips["long.mp4"], VideoSettings(stack_frames=3))
    used = {i for unit in ours.units for i in unit.frames}
    assert len(converted) == len(used) < ours.metadata.total_frames


def test_bytes_and_file_objects_equal_paths(clips):
    path = clips["vp8.webm"]
    by_path = process_video(path)
    by_bytes = process_video(path.read_bytes())
    with open(path, "rb") as f:
        by_file = process_video(f)
    by_url = process_video("data:video/webm;base64," + base64.b64encode(path.read_bytes()).decode())
    for other in (by_bytes, by_file, by_url):
        assert other.frame_indices == by_path.frame_indices
        assert torch.equal(other.pixel_values, by_path.pixel_values)


def test_a_file_object_is_read_from_where_it_was_after_counting_frames(tmp_path):
    """A WebM header has no frame count, so the frames are counted by demuxing the same file object first; a clip
    bigger than the demuxer's read buffer must still decode from its start."""
    path = tmp_path / "big.webm"
    container = av.open(str(path), "w")
    stream = container.add_stream("libvpx", rate=6)
    stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 320, 240, "yuv420p", 40_000_000
    for i in range(18):
        noise = np.random.default_rng(i).integers(0, 256, (240, 320, 3), dtype=np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(noise, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    assert path.stat().st_size > 1 << 20
    by_path = process_video(path)
    with open(path, "rb") as f:
        by_file = process_video(f)
    assert by_file.frame_indices == by_path.frame_indices
    assert torch.equal(by_file.pixel_values, by_path.pixel_values)


# -- errors ---------------------------------------------------------------------------------------------------------


def audio_only_wav() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return buffer.getvalue()


def zero_frame_file(path: Path, codec: str, pix_fmt: str) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
    container.start_encoding()
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def test_error_cases(clips, tmp_path):
    good = clips["h264.mp4"].read_bytes()
    cases = [
        (b"\x00garbage" * 200, "not a readable video"),
        (good[: len(good) // 3] + b"\xff" * 64, "corrupt|not a readable video"),
        (audio_only_wav(), "no video stream.*audio"),
        (zero_frame_file(tmp_path / "empty.avi", "mjpeg", "yuvj420p"), "no video frames"),
        (zero_frame_file(tmp_path / "empty.mp4", "libx264", "yuv420p"), "no video stream"),
        (b"", "empty"),
        (tmp_path / "missing.mp4", "not found"),
        ("https://example.com/a.mp4", "remote video URLs"),
        (12345, "unsupported video input type"),
        (io.StringIO("text"), "binary mode"),
    ]
    for source, message in cases:
        with pytest.raises(VideoError, match=message):
            process_video(source)
    assert issubclass(VideoError, InvalidInputError)


def test_frame_size_limit(clips):
    settings = VideoSettings(image=ImageSettings(max_pixels=96 * 64))
    assert process_video(clips["h264.mp4"], settings).num_tokens > 0
    with pytest.raises(VideoError, match="frame size is too large"):
        process_video(clips["h264-odd.mp4"], settings)
    with pytest.raises(VideoError, match="stacked canvas is too large"):
        process_video(clips["h264.mp4"], VideoSettings(image=settings.image, stack_frames=3))
    with pytest.raises(VideoError, match="stack_frames"):
        VideoSettings(stack_frames=0)


# -- placeholders and token ids ---------------------------------------------------------------------------------------


VID, IMG = {"type": "video"}, {"type": "image"}


def reference_ids(reference_processor, messages, images, videos, processed, **options):
    text = reference_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = reference_processor(
        text=[text],
        images=[images] if images else None,
        videos=[all_frames(v) for v in videos] if videos else None,
        video_metadata=[reference_metadata(p) for p in processed] if videos else None,
        do_sample_frames=True,
        **options,
    )
    return out["input_ids"][0].tolist()


def test_video_defaults_come_from_the_processor_config(ours):
    settings = ours.video_settings
    assert (settings.max_num_frames, settings.stack_frames, settings.image.max_slice_nums) == (128, 1, 9)
    assert settings.downsample_mode == "16x" and ours.use_image_id


@pytest.mark.parametrize(
    "options", [dict(), dict(stack_frames=5, downsample_mode="4x"), dict(use_image_id=False, max_num_frames=2)]
)
@pytest.mark.parametrize("name", ["h264.mp4", "sliced.mp4", "vfr.mkv", "mjpeg-odd.avi"])
def test_input_ids_match_reference_processor(ours, reference_processor, clips, name, options):
    messages = [user(VID, "What happens?")]
    result = ours(messages, videos=[clips[name]], **options)
    assert result.images == [] and len(result.videos) == 1
    expected = reference_ids(reference_processor, messages, [], [clips[name]], result.videos, **options)
    assert result.input_ids.tolist() == expected
    assert result.text.count(PAD) == result.videos[0].num_tokens


@pytest.mark.parametrize("options", [dict(), dict(stack_frames=3, max_slice_nums=1), dict(use_image_id=False)])
def test_mixed_images_and_videos_match_reference_processor(ours, reference_processor, clips, options):
    messages = [
        user(VID, IMG, "Compare.", VID),
        {"role": "assistant", "content": "They differ."},
        user(IMG, "And now?"),
    ]
    images, videos = [image(1000, 300), image(200, 100, seed=1)], [clips["sliced.mp4"], clips["vfr.mp4"]]
    result = ours(messages, images=images, videos=videos, **options)
    expected = reference_ids(reference_processor, messages, images, videos, result.videos, **options)
    assert result.input_ids.tolist() == expected
    if options.get("use_image_id", True):  # images and videos are numbered separately, one id per video
        ids = [result.text[i + 10] for i in range(len(result.text)) if result.text.startswith("<image_id>", i)]
        assert ids == ["0", "0", "1", "1"]
        assert result.text.count("<image_id>") == 4


def test_placeholder_structure(ours, clips):
    result = ours([user(VID, "x")], videos=[clips["sliced.mp4"]], stack_frames=3)
    video = result.videos[0]
    expected = "<image_id>0</image_id>"
    for plan in video.plans:
        source, *slices = plan.units
        expected += f"<image>{PAD * source.num_tokens}</image>"
        if plan.grid:
            rows, cols = plan.grid
            expected += "\n".join([f"<slice>{PAD * slices[0].num_tokens}</slice>" * cols] * rows)
    assert expected in result.text
    assert any(plan.grid for plan in video.plans) and any(u.stacked for u in video.units)
    assert "</slice><image>" in expected and "\n<image>" not in expected  # units back to back, no separator
    assert result.text.count(PAD) == video.num_tokens == sum(video.num_tokens_per_unit)


def test_video_parts_carry_their_data(ours, clips):
    path = clips["mpeg4.avi"]
    explicit = ours([user(VID, "x")], videos=[path])
    encoded = base64.b64encode(path.read_bytes()).decode()
    for part in (
        {"type": "video", "video": str(path)},
        {"type": "video_url", "video_url": {"url": f"data:video/avi;base64,{encoded}"}},
        {"type": "video", "base64": encoded},
    ):
        result = ours([user(part, "x")])
        assert result.input_ids.tolist() == explicit.input_ids.tolist()
        assert torch.equal(result.videos[0].pixel_values, explicit.videos[0].pixel_values)


@pytest.mark.parametrize(
    "messages,videos,message",
    [
        ([user(VID, "x")], [], "1 video placeholder.*0 video"),
        ([user("x")], ["a.mp4"], "0 video placeholder.*1 video"),
        ([user(VID, "x")], None, "a video content part carries no video data"),
        ([user(VID, "x")], "a.mp4", "videos must be a list"),
        ([user({"type": "video", "video": "missing.mp4"}, "x")], None, "video file not found"),
        ([user({"type": "video", "base64": "***"}, "x")], None, "invalid base64"),
    ],
)
def test_invalid_video_requests(ours, messages, videos, message):
    with pytest.raises(InvalidInputError, match=message):
        ours(messages, videos=videos)


# -- end to end ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_image,mode", [(False, "16x"), (False, "4x"), (True, "16x")])
def test_greedy_with_video_equals_reference_generate(ours, clips, with_image, mode):
    from transformers import MiniCPMV4_6ImageProcessor

    ref, directory = reference_checkpoint("base", REAL)  # fed our tokenizer's ids
    model = load_model(directory)
    path = clips["h264-odd.mp4"]
    messages = [user(IMG, VID, "Describe.")] if with_image else [user(VID, "Describe.")]
    images = [image(300, 200, seed=3)] if with_image else []
    result = ours(messages, images=images, videos=[path], stack_frames=3, max_num_frames=2, downsample_mode=mode)
    video = result.videos[0]
    expected_video = reference_video(path, video, stack_frames=3, max_num_frames=2, downsample_mode=mode)
    assert_same_as_reference(video, expected_video)

    kwargs = {
        "pixel_values_videos": expected_video["pixel_values_videos"],
        "target_sizes_videos": expected_video["target_sizes_videos"],
    }
    image_features = None
    if with_image:
        expected_image = MiniCPMV4_6ImageProcessor()(images, downsample_mode=mode, return_tensors="pt")
        kwargs.update(pixel_values=expected_image["pixel_values"], target_sizes=expected_image["target_sizes"])
        processed = result.images[0]
        image_features = model.encode_images(processed.pixel_values, processed.target_sizes, mode)
    video_features = model.encode_images(video.pixel_values, video.target_sizes, mode)
    ids = result.input_ids
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids[None], downsample_mode=mode, do_sample=False, max_new_tokens=16, min_new_tokens=16, **kwargs
        )[0, len(ids) :].tolist()
    got = model.greedy(ids, 16, image_features=image_features, video_features=video_features)
    assert got == expected
