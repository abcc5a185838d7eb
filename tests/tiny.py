"""The tests' one helpers module (fixtures live in conftest.py): tiny random-weight reference models built with
transformers (the test oracle) and saved like real checkpoints, plus the builders the test modules share."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Vocab:
    """A checkpoint's vocabulary: its size, the placeholder ids its config.json names (the model reads them there),
    and the bound below which random ids are ordinary text."""

    size: int
    image: int
    video: int
    text: int


# The real tokenizer's vocabulary and <|image_pad|>/<|video_pad|> ids: for checkpoints used through the tokenizer
# (LLM, server, CLI). An embedding and head of 248k rows make a checkpoint ~80 MB.
REAL = Vocab(248094, 248056, 248057, text=248000)
# Checkpoints fed raw ids (model-vs-reference comparisons, kernels, quantization, loading) need no tokenizer. Not a
# multiple of 64, like the real one, so the head's ragged tail is exercised; the placeholders sit inside it.
SMALL = Vocab(1030, 1000, 1001, text=1000)


def tiny_config(vocab: Vocab = SMALL, **overrides):
    from transformers import MiniCPMV4_6Config

    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, patch_size=14, image_size=980
    )
    text = dict(
        model_type="qwen3_5_text",
        vocab_size=vocab.size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,  # more value than key heads, as in the reference defaults
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        tie_word_embeddings=True,
    )
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    top = dict(insert_layer_id=1, image_token_id=vocab.image, video_token_id=vocab.video, tie_word_embeddings=True)
    top.update(overrides)
    return MiniCPMV4_6Config(vision_config=vision, text_config=text, **top)


VARIANTS = {
    "base": {},
    "merger_times_2": {"merger_times": 2},
    "insert_layer_2": {"insert_layer_id": 2},
    "untied_equal_heads": {"tie_word_embeddings": False, "text": {"tie_word_embeddings": False, "linear_num_value_heads": 2}},
}


@functools.cache
def reference_checkpoint(variant: str = "base", vocab: Vocab = SMALL) -> tuple[object, Path]:
    """(reference model in eval mode, directory it was saved to) for a tiny config; built once per session.

    The small vocabulary unless the test goes through the real tokenizer (``vocab=REAL``)."""
    from transformers import MiniCPMV4_6ForConditionalGeneration

    torch.manual_seed(0)
    overrides = {k: dict(v) if isinstance(v, dict) else v for k, v in VARIANTS[variant].items()}
    model = MiniCPMV4_6ForConditionalGeneration(tiny_config(vocab, **overrides)).eval()
    with torch.no_grad():  # the default init leaves norms at identity; perturb them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.2)
    directory = Path(tempfile.mkdtemp(prefix="minicpmv-tiny-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # never leave them behind
    model.save_pretrained(directory)
    return model, directory


def link_tree(source: Path, target: Path, dirs_exist_ok: bool = False) -> None:
    """A copy of a directory for reading only: hard links where the file system allows, else copies."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=dirs_exist_ok)


def to_patches(pixel_values: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """Reference NaViT packing [1, 3, p, L*p] -> ours [L, 3*p*p]."""
    length = pixel_values.shape[-1] // patch
    return pixel_values[0].reshape(3, patch, length, patch).permute(2, 0, 1, 3).reshape(length, 3 * patch * patch)


def tokens_per_unit(target_sizes: torch.Tensor, mode: str, merger_times: int = 1) -> list[int]:
    divisor = (16 if mode == "16x" else 4) * 4 ** (merger_times - 1)
    return [int(h * w) // divisor for h, w in target_sizes.tolist()]


def prompt_with_placeholders(counts: list[int], token: int = SMALL.image, seed: int = 0, text: int = SMALL.text):
    """Random text tokens (below ``text``) with one run of ``token`` per entry of ``counts`` in between."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, text, (7,), generator=g)]
    for n in counts:
        parts += [torch.full((n,), token), torch.randint(0, text, (5,), generator=g)]
    return torch.cat(parts)


# -- messages and media ----------------------------------------------------------------------------------------------
def user(*parts) -> dict:
    """A user message: strings become text parts, images (PIL or arrays) image parts, Paths video parts; dicts stay."""
    import PIL.Image

    def part(p):
        if isinstance(p, str):
            return {"type": "text", "text": p}
        if isinstance(p, (PIL.Image.Image, np.ndarray)):
            return {"type": "image", "image": p}
        if isinstance(p, Path):
            return {"type": "video", "video": str(p)}
        return p

    return {"role": "user", "content": [part(p) for p in parts]}


def image(width: int, height: int, seed: int = 0):
    """A random RGB PIL image (``np.asarray`` of it for an array input)."""
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def video_frame(i: int, height: int, width: int) -> np.ndarray:
    """A frame that differs from every other: a ramp shifted by the frame number, plus noise."""
    ramp = (np.arange(width)[None, :, None] * 3 + np.arange(height)[:, None, None] + 17 * i) % 256
    noise = np.random.default_rng(i).integers(0, 40, (height, width, 3))
    return ((ramp + noise) % 256).astype(np.uint8)


def write_clip(path: Path, codec: str, width: int, height: int, fps: int, frames: int, pix_fmt="yuv420p", pts=None):
    """A clip of ``video_frame`` frames written with PyAV; ``pts`` (ms) for a variable frame rate."""
    import av

    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    if codec == "libx264":
        stream.options = {"preset": "ultrafast"}
    if pts is not None:
        stream.codec_context.time_base = Fraction(1, 1000)
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(video_frame(i, height, width), format="rgb24")
        if pts is not None:
            frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


_decoded: dict[Path, np.ndarray] = {}


def all_frames(path: Path) -> np.ndarray:
    """Every frame of a clip, decoded with PyAV (what the reference video processor is handed)."""
    import av

    if path not in _decoded:
        with av.open(str(path)) as container:
            _decoded[path] = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return _decoded[path]


def reference_metadata(ours):
    """transformers' VideoMetadata for the facts our decoder read from a clip."""
    from transformers.video_utils import VideoMetadata

    m = ours.metadata
    return VideoMetadata(total_num_frames=m.total_frames, fps=m.fps, duration=m.duration)


def reference_greedy(processor, llm, conv, n):
    """transformers' generate on the same conversation: the reference processor (conftest's ``reference_processor``)
    and the reference model behind ``tiny_dir``."""
    from minicpmv.processing.video import process_video

    ref, _ = reference_checkpoint("base", REAL)
    messages = conv["messages"]
    mode = conv.get("downsample_mode", "16x")
    text = llm.processor.render(messages, add_generation_prompt=True, enable_thinking=False)
    images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    videos = [Path(p["video"]) for m in messages for p in m["content"] if p["type"] == "video"]
    extra = {}
    if videos:
        extra = dict(videos=[all_frames(v) for v in videos], do_sample_frames=True,
                     video_metadata=[reference_metadata(process_video(v)) for v in videos])
    inputs = processor(text=text, images=[images] if images else None, downsample_mode=mode, return_tensors="pt", **extra)
    with torch.no_grad():
        out = ref.generate(**inputs, downsample_mode=mode, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# -- a server on 127.0.0.1 -------------------------------------------------------------------------------------------
KEY = "test-key"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "scale": {"type": "number"},
                "metric": {"type": "boolean"},
                "tags": {"type": "array"},
                "where": {"type": "object"},
                "note": {"type": ["string", "null"]},
            },
        },
    },
}


def call_xml(name, **params):
    """A tool call as the model writes it (Qwen3-coder XML)."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


class Server:
    """Our app served by uvicorn in a thread on a free port, with an official openai client for it."""

    def __init__(self, llm, config):
        import uvicorn
        from openai import OpenAI

        from minicpmv.serve.app import create_app

        self.llm = llm
        self.app = create_app(llm, config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, body, key=KEY, **kw):
        import json

        import httpx2 as httpx

        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        # json.dumps escapes non-ASCII, so even text that is not valid Unicode reaches the server as the client sent it
        kw.setdefault("content", json.dumps(body))
        return httpx.post(self.url + "/v1/chat/completions", headers=headers, timeout=60, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def eventually(check, timeout: float = 10.0) -> bool:
    """Poll ``check()`` until true (the engine thread acts on aborts between its steps); False after ``timeout``."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def png_bytes(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def from_patches(patches: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """Ours [L, 3*p*p] -> reference NaViT packing [1, 3, p, L*p] (the inverse of ``to_patches``)."""
    length = patches.shape[0]
    return patches.reshape(length, 3, patch, patch).permute(1, 2, 0, 3).reshape(1, 3, patch, length * patch)


LM_TARGETS = r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|in_proj_qkv|in_proj_z|in_proj_a|in_proj_b|out_proj|gate_proj|up_proj|down_proj)$"
VISION_TARGETS = r"^model\.(vision_tower|merger)\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2|linear_1|linear_2)$"


def peft_adapter(directory: Path, target_modules: str, r: int = 4, alpha: float = 8, seed: int = 0,
                 use_rslora: bool = False, safe_serialization: bool = True, variant: str = "base", std: float = 0.3,
                 vocab: Vocab = REAL):
    """Save a PEFT LoRA adapter made on (a copy of) the tiny reference model, every B non-zero; returns the
    reference + peft model in eval mode."""
    import copy

    from peft import LoraConfig, get_peft_model

    ref, _ = reference_checkpoint(variant, vocab)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                        init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(ref), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * std)
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    return model.eval()


REPO = Path(__file__).resolve().parents[1]
MINICPMV_EXE = str(Path(__import__("sys").executable).with_name("minicpmv"))
# subprocesses run this checkout's package (the venv's entry point may be an editable install of another one) and
# never reach for a hub
SUBPROCESS_ENV = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def start_server(*args, timeout: float = 120):
    """(process, base url) of ``minicpmv serve ARGS`` on a free 127.0.0.1 port, once /health answers."""
    import socket
    import subprocess
    import time

    import httpx2 as httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([MINICPMV_EXE, "serve", *map(str, args), "--port", str(port)], stderr=subprocess.PIPE,
                            text=True, env=SUBPROCESS_ENV)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
    proc.kill()
    raise AssertionError("server did not come up")


def metric(text: str, name: str) -> float:
    """The value of the first sample of ``name`` in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# -- other tools' quantized checkpoints (test_quant_formats) -----------------------------------------------------------
# Reference packers written from the libraries' documented layouts (AutoGPTQ / GPTQModel, AutoAWQ's GEMM): they
# pack; minicpmv.model.formats unpacks. Round-to-nearest quantization is enough: the loader's job is the layout.
GPTQ_SKIP = ("in_proj_a", "in_proj_b")  # GPTQModel's MiniCPM-V 4.6 definition leaves these in bf16


def _pack_fields(values: np.ndarray, bits: int, axis: int, order: list[int] | None = None) -> np.ndarray:
    """Unsigned ``bits``-bit values packed into int32 words along ``axis`` (slot s of word j: index
    j * 32/bits + s, or j * 8 + order[s])."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], -1, per)
    if order is not None:
        v = v[..., order]
    words = np.zeros(v.shape[:-1], dtype=np.uint32)
    for slot in range(per):
        words |= (v[..., slot] & ((1 << bits) - 1)) << np.uint32(bits * slot)
    return np.moveaxis(words.view(np.int32), -1, axis)


def rtn_groups(w: torch.Tensor, groups: torch.Tensor, n_groups: int, bits: int, sym: bool, min_zero: int = 0):
    """Round-to-nearest (q [N, K] ints, zeros [N, G] ints, scales [N, G] fp16) with W ~= (q - z) s per group."""
    maxq = (1 << bits) - 1
    wf = w.double()
    index = groups.expand(w.shape[0], -1)
    lo = torch.zeros(w.shape[0], n_groups, dtype=torch.double).scatter_reduce(1, index, wf, "amin")  # (includes 0)
    hi = torch.zeros(w.shape[0], n_groups, dtype=torch.double).scatter_reduce(1, index, wf, "amax")
    if sym:
        top = torch.maximum(lo.abs(), hi)
        scales, zeros = (2 * top / maxq).clamp(min=1e-6), torch.full_like(top, (maxq + 1) / 2)
    else:
        scales = ((hi - lo) / maxq).clamp(min=1e-6)
        zeros = torch.round(-lo / scales).clamp(min_zero, maxq)
    scales = scales.half().double()
    s_k, z_k = scales[:, groups].double(), zeros[:, groups].double()
    q = torch.round(wf / s_k + z_k).clamp(0, maxq)
    return q.long(), zeros.long(), scales.half()


ACT_ORDER_INPUTS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "in_proj_z": "in_proj_qkv"}


def act_order_seed(name: str) -> int:
    """One permutation per input: GPTQ orders a linear's inputs by its inputs' Hessian, the same for every linear
    reading that input (q/k/v, gate/up, in_proj_qkv/z)."""
    import zlib

    base, _, last = name.rpartition(".")
    return zlib.crc32(f"{base.rpartition('.')[0]}.{ACT_ORDER_INPUTS.get(last, last)}".encode())


def gptq_tensors(w: torch.Tensor, bits: int, group: int, sym: bool, v2: bool, act_order: bool, seed: int = 0):
    """One linear's GPTQ tensors and its dequantized float32 weight."""
    n, k = w.shape
    size = k if group == -1 else group
    n_groups = -(-k // size)
    if act_order:  # GPTQ quantizes inputs in a permuted order: g_idx follows the permutation
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[perm] = torch.arange(k) // size
    else:
        g_idx = torch.arange(k) // size
    q, z, s = rtn_groups(w, g_idx, n_groups, bits, sym, min_zero=0 if v2 else 1)  # v1 cannot store a zero of 0
    stored_z = z if v2 else z - 1
    stored_z = torch.cat([stored_z, stored_z.new_zeros(-n % 8, n_groups)])  # outputs padded to whole words
    tensors = {
        "qweight": torch.from_numpy(_pack_fields(q.t().numpy(), bits, 0)),
        "qzeros": torch.from_numpy(_pack_fields(stored_z.t().numpy(), bits, 1)),
        "scales": s.t().contiguous(),
        "g_idx": g_idx.int(),
    }
    return tensors, ((q - z[:, g_idx]).double() * s.double()[:, g_idx]).float()


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_tensors(w: torch.Tensor, group: int):
    """One linear's AWQ GEMM tensors and its dequantized float32 weight."""
    n, k = w.shape
    g_idx = torch.arange(k) // group
    q, z, s = rtn_groups(w, g_idx, -(-k // group), 4, sym=False)
    tensors = {
        "qweight": torch.from_numpy(_pack_fields(q.t().numpy(), 4, 1, AWQ_ORDER)),
        "qzeros": torch.from_numpy(_pack_fields(z.t().numpy(), 4, 1, AWQ_ORDER)),
        "scales": s.t().contiguous(),
    }
    return tensors, ((q - z[:, g_idx]).double() * s.double()[:, g_idx]).float()


def quantized_checkpoint(kind: str, target: Path, variant: str = "base", vocab: Vocab = SMALL,
                         **settings) -> tuple[Path, Path]:
    """The tiny reference checkpoint with its language model's linears quantized as ``kind`` ("gptq" or "awq",
    ``settings``: bits, group, sym, v2, act_order / group), written to ``target``; and beside it (``target``-dense)
    the same model with those weights replaced by their dequantized values, as a plain checkpoint."""
    import json

    from safetensors.torch import load_file, save_file

    _, source = reference_checkpoint(variant, vocab)
    weights = load_file(str(source / "model.safetensors"))
    dense_dir = target.with_name(target.name + "-dense")
    for d in (target, dense_dir):
        d.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.suffix == ".json" or f.suffix == ".jinja":
                shutil.copy(f, d / f.name)
    packed, dense = {}, {}
    names = [n[: -len(".weight")] for n in weights if n.endswith(".weight") and weights[n].dim() == 2]
    names = [n for n in names if n.startswith("model.language_model.layers.") and not n.endswith(GPTQ_SKIP)]
    if settings.get("head"):  # GPTQModel's lm_head=True (a tied head is quantized from the embedding)
        weights.setdefault("lm_head.weight", weights["model.language_model.embed_tokens.weight"])
        names.append("lm_head")
    for name in sorted(names):
        w = weights[f"{name}.weight"]
        if kind == "gptq":
            tensors, deq = gptq_tensors(w.float(), settings.get("bits", 4), settings.get("group", 32),
                                        settings.get("sym", True), settings.get("v2", False),
                                        settings.get("act_order", False), seed=act_order_seed(name))
        else:
            tensors, deq = awq_tensors(w.float(), settings.get("group", 32))
        packed.update({f"{name}.{p}": t.contiguous() for p, t in tensors.items()})
        dense[f"{name}.weight"] = deq.to(w.dtype)
    for name, t in weights.items():
        base = name[: -len(".weight")]
        if f"{base}.qweight" not in packed:
            packed[name] = t
        dense[name] = dense.get(name, t)
    save_file(packed, str(target / "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, str(dense_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    if kind == "gptq":
        section = {"quant_method": "gptq", "bits": settings.get("bits", 4), "group_size": settings.get("group", 32),
                   "desc_act": settings.get("act_order", False), "sym": settings.get("sym", True),
                   "checkpoint_format": "gptq_v2" if settings.get("v2") else "gptq", "damp_percent": 0.01}
    else:
        section = {"quant_method": "awq", "bits": 4, "group_size": settings.get("group", 32), "version": "gemm",
                   "zero_point": True}
    config["quantization_config"] = section
    (target / "config.json").write_text(json.dumps(config, indent=2))
    if settings.get("head"):  # the dense twin holds the dequantized head beside the embedding: untied
        dense_config = json.loads((source / "config.json").read_text())
        dense_config["tie_word_embeddings"] = dense_config["text_config"]["tie_word_embeddings"] = False
        (dense_dir / "config.json").write_text(json.dumps(dense_config, indent=2))
    return target, dense_dir


def bnb_checkpoint(target: Path, variant: str = "base", double_quant: bool = True) -> tuple[Path, Path]:
    """The tiny reference checkpoint with every linear but the head quantized to NF4 by bitsandbytes itself
    (blocksize 64, as transformers' ``load_in_4bit`` + ``save_pretrained`` store it), and its dense twin holding
    bitsandbytes' own dequantization of those weights."""
    import json
    import re

    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from safetensors.torch import load_file, save_file

    _, source = reference_checkpoint(variant)
    weights = load_file(str(source / "model.safetensors"))
    dense_dir = target.with_name(target.name + "-dense")
    for d in (target, dense_dir):
        d.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.suffix in (".json", ".jinja"):
                shutil.copy(f, d / f.name)
    packed, dense = dict(weights), dict(weights)
    pattern = re.compile(f"{LM_TARGETS}|{VISION_TARGETS}".replace("$", r"\.weight$"))
    for name in sorted(n for n in weights if pattern.match(n)):
        w = weights[name]
        with torch._dynamo.config.patch(disable=True):  # (bitsandbytes would torch.compile its CPU ops: slow)
            q, state = quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
            dense[name] = dequantize_4bit(q, state).to(w.dtype)
        del packed[name]
        packed[name] = q
        packed.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(packed, str(target / "model.safetensors"), metadata={"format": "pt"})
    save_file(dense, str(dense_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": ["lm_head"]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target, dense_dir


# llama.cpp's GGUF tools (scripts/fetch_llama_cpp.sh: the converter and llama-quantize from the llama-cpp-python
# sdist), for tests/test_gguf.py.
@functools.cache
def llama_cpp() -> Path:
    """The tools' directory, with the converter (fetched on first use, seconds). llama-quantize is there only when
    it was built (``scripts/fetch_llama_cpp.sh`` without ``--converter-only``: 10-45 min on 2 cores)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "fetch_llama_cpp.sh"
    out = subprocess.run(["sh", str(script), "--converter-only"],
                         env={**os.environ, "PYTHON": sys.executable}, check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def llama_quantize_built() -> bool:
    return (llama_cpp() / "bin" / "llama-quantize").is_file()


def convert_to_gguf(checkpoint: Path, out: Path, mmproj: bool = False, outtype: str = "f32") -> Path:
    """``convert_hf_to_gguf.py CHECKPOINT --no-mtp`` (the language model) or ``--mmproj`` (the vision projector)."""
    import subprocess
    import sys

    tools = llama_cpp()
    args = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", outtype,
            "--outfile", str(out), *(["--mmproj"] if mmproj else ["--no-mtp"])]
    env = {**os.environ, "PYTHONPATH": str(tools / "gguf-py")}
    done = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stdout[-3000:]}")
    return out


def llama_quantize(source: Path, out: Path, kind: str) -> Path:
    """llama.cpp's ``llama-quantize SOURCE OUT KIND`` (Q8_0, Q4_0, Q4_K_M, ...)."""
    import subprocess

    done = subprocess.run([str(llama_cpp() / "bin" / "llama-quantize"), str(source), str(out), kind, "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise RuntimeError(f"llama-quantize failed:\n{done.stdout[-3000:]}")
    return out
