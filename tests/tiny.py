"""Tiny random-weight reference models built with transformers (the test oracle), saved like real checkpoints."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

IMAGE_TOKEN, VIDEO_TOKEN = 248056, 248057
VOCAB = 248094


def tiny_config(**overrides):
    from transformers import MiniCPMV4_6Config

    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, patch_size=14, image_size=980
    )
    text = dict(
        model_type="qwen3_5_text",
        vocab_size=VOCAB,
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
    top = dict(insert_layer_id=1, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, tie_word_embeddings=True)
    top.update(overrides)
    return MiniCPMV4_6Config(vision_config=vision, text_config=text, **top)


VARIANTS = {
    "base": {},
    "merger_times_2": {"merger_times": 2},
    "insert_layer_2": {"insert_layer_id": 2},
    "untied_equal_heads": {"tie_word_embeddings": False, "text": {"tie_word_embeddings": False, "linear_num_value_heads": 2}},
}


@functools.cache
def reference_checkpoint(variant: str = "base") -> tuple[object, Path]:
    """(reference model in eval mode, directory it was saved to) for a tiny config; built once per session."""
    from transformers import MiniCPMV4_6ForConditionalGeneration

    torch.manual_seed(0)
    overrides = {k: dict(v) if isinstance(v, dict) else v for k, v in VARIANTS[variant].items()}
    model = MiniCPMV4_6ForConditionalGeneration(tiny_config(**overrides)).eval()
    with torch.no_grad():  # the default init leaves norms at identity; perturb them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.2)
    directory = Path(tempfile.mkdtemp(prefix="minicpmv-tiny-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # ~125 MB each: never leave them behind
    model.save_pretrained(directory)
    return model, directory


def to_patches(pixel_values: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """Reference NaViT packing [1, 3, p, L*p] -> ours [L, 3*p*p]."""
    length = pixel_values.shape[-1] // patch
    return pixel_values[0].reshape(3, patch, length, patch).permute(2, 0, 1, 3).reshape(length, 3 * patch * patch)


def tokens_per_unit(target_sizes: torch.Tensor, mode: str, merger_times: int = 1) -> list[int]:
    divisor = (16 if mode == "16x" else 4) * 4 ** (merger_times - 1)
    return [int(h * w) // divisor for h, w in target_sizes.tolist()]


def prompt_with_placeholders(counts: list[int], token: int = IMAGE_TOKEN, seed: int = 0) -> torch.Tensor:
    """Random text tokens with one run of ``token`` per entry of ``counts`` in between."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, 248000, (7,), generator=g)]
    for n in counts:
        parts += [torch.full((n,), token), torch.randint(0, 248000, (5,), generator=g)]
    return torch.cat(parts)


def user(*parts) -> dict:
    """A user message from text strings and content-part dicts."""
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def image(width: int, height: int, seed: int = 0):
    """A random RGB PIL image."""
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def eventually(check, timeout: float = 10.0) -> bool:
    """Poll ``check()`` until true (the engine thread acts on aborts between its steps); False after ``timeout``."""
    import time

    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True
