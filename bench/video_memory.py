"""Peak memory of `process_video` on a 10-minute 1280x720 clip (128 sampled frames by default).

The clip is written once with PyAV (x264 ultrafast, 2 fps) into the bench cache. Each measurement runs in a fresh
child process, so that peak RSS (``ru_maxrss``) belongs to that run alone; the child's RSS after its imports is the
baseline. Three children:

- ``decode``: decode the whole clip, converting nothing (the decoder's fixed overhead: codec buffers, threads);
- ``process`` with the default settings (``max_slice_nums`` 9 from processor_config.json) and with 1 (the model
  card's recommendation for video).

Budget = sampled RGB frames (what a decode-then-process pipeline would hold) + processed pixel tensors + decoder
overhead. Usage: python bench/video_memory.py [--minutes 10] [--fps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CACHE, peak_rss_mb, proc_status, table  # noqa: E402

MiB = 1 << 20


def write_clip(path: Path, minutes: float, fps: int, width: int = 1280, height: int = 720) -> None:
    import av
    import numpy as np

    tmp = path.with_suffix(".partial.mp4")
    frames = int(minutes * 60 * fps)
    ramp = (np.arange(width)[None, :] // 4 + np.arange(height)[:, None] // 4).astype(np.uint8)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}
        for i in range(frames):
            # a moving gradient with a bright bar that walks across: every frame differs, and it compresses well
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[..., 0] = ramp + np.uint8(i % 256)
            rgb[..., 1] = ramp[::-1] + np.uint8(2 * i % 256)
            rgb[..., 2] = 128
            x = (i * 7) % (width - 40)
            rgb[:, x : x + 40] = 255
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)


def child(mode: str, path: str, max_slice_nums: int) -> dict:
    import av
    import torch  # noqa: F401  (imported before the baseline is taken)

    from minicpmv.processing.image import ImageSettings
    from minicpmv.processing.video import VideoSettings, probe_video, process_video

    probe_video(path)  # warm up lazy imports and the demuxer
    baseline = proc_status("VmRSS") / MiB
    start = time.perf_counter()
    if mode == "decode":
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decoded = sum(1 for _ in container.decode(stream))
        return {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "seconds": time.perf_counter() - start,
                "decoded": decoded}
    settings = VideoSettings(image=ImageSettings(max_slice_nums=max_slice_nums))
    out = process_video(path, settings)
    seconds = time.perf_counter() - start
    meta = out.metadata
    used = {i for unit in out.units for i in unit.frames}
    return {
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
        "seconds": seconds,
        "units": len(out.units),
        "tokens": out.num_tokens,
        "sampled_frames": len(used),
        "frame_bytes": len(used) * meta.height * meta.width * 3,
        "pixel_bytes": out.pixel_values.numel() * out.pixel_values.element_size(),
        "duration": meta.duration,
        "total_frames": meta.total_frames,
    }


def run_child(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--fps", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "MAX_SLICE_NUMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, slices = args.child
        print(json.dumps(child(mode, path, int(slices))))
        return

    path = CACHE / f"video-{args.minutes:g}min-1280x720-{args.fps}fps.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_clip(path, args.minutes, args.fps)
        print(f"wrote {path} ({path.stat().st_size / MiB:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    decode = run_child("decode", str(path), "9")
    overhead = decode["peak_mb"] - decode["baseline_mb"]
    print(f"clip: {path.name}, {decode['decoded']} frames; decode-only pass {decode['seconds']:.1f} s, "
          f"decoder overhead (peak - baseline) {overhead:.0f} MiB")

    rows = []
    for slices in (9, 1):
        r = run_child("process", str(path), str(slices))
        frames_mb, pixels_mb = r["frame_bytes"] / MiB, r["pixel_bytes"] / MiB
        measured = r["peak_mb"] - r["baseline_mb"]
        budget = frames_mb + pixels_mb + overhead
        rows.append([
            slices, r["sampled_frames"], r["units"], r["tokens"], frames_mb, pixels_mb, overhead, budget, measured,
            measured - pixels_mb, measured / budget, r["seconds"],
        ])
    header = ["max_slice", "frames", "units", "tokens", "frames MiB", "pixels MiB", "decoder MiB", "budget MiB",
              "peak-base MiB", "peak-pixels MiB", "peak/budget", "seconds"]
    print(table(rows, header))
    print("budget = sampled RGB frames + processed pixel tensors + decoder overhead; peak-base = measured peak RSS "
          "minus the child's RSS after imports")


if __name__ == "__main__":
    main()
