"""Typed configs parsed from a checkpoint's ``config.json``.

Defaults equal the reference classes' defaults (``MiniCPMV4_6Config``, ``MiniCPMV4_6VisionConfig``,
``Qwen3_5TextConfig``), so a config.json that omits a key means the same thing here as there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from minicpmv.errors import CheckpointError

MODEL_TYPE = "minicpmv4_6"
VISION_MODEL_TYPE = "minicpmv4_6_vision"
TEXT_MODEL_TYPE = "qwen3_5_text"
DOWNSAMPLE_MODES = ("16x", "4x")


def read_json(path: Path, default: dict | None = None) -> dict:
    """A checkpoint's JSON file, which must hold an object; ``default`` when the file is absent (if given)."""
    if default is not None and not path.exists():
        return default
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no {path.name} in {path.parent}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except (OSError, ValueError) as exc:  # a directory, unreadable, not UTF-8
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{key} in config.json must be an object, not {type(value).__name__}")
    return value


_TYPE_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "int | None": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "tuple[int, int]": lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(type(x) is int for x in v),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


def _known_fields(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The entries of ``raw`` that are fields of ``cls``, each checked against the field's type."""
    out = {}
    for f in fields(cls):
        if f.name in raw:
            check = _TYPE_CHECKS.get(f.type)
            if check is not None and not check(raw[f.name]):
                raise CheckpointError(f"{where}: {f.name} must be of type {f.type}, got {raw[f.name]!r}")
            out[f.name] = raw[f.name]
    return out


def _check_model_type(raw: dict[str, Any], expected: str, where: str) -> None:
    found = raw.get("model_type", expected)
    if found != expected:
        raise CheckpointError(f"unsupported model_type {found!r} in {where}: this package runs {expected!r} only")


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    insert_layer_id: int = 6
    window_kernel_size: tuple[int, int] = (2, 2)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        _check_model_type(raw, VISION_MODEL_TYPE, "vision_config")
        cfg = cls(**_known_fields(cls, raw, "vision_config"))
        cfg.window_kernel_size = tuple(cfg.window_kernel_size)
        if cfg.window_kernel_size[0] != cfg.window_kernel_size[1]:
            raise CheckpointError(f"window_kernel_size must be square, got {cfg.window_kernel_size}")
        return cfg


@dataclass
class TextConfig:
    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: list[str] = field(default_factory=list)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TextConfig:
        _check_model_type(raw, TEXT_MODEL_TYPE, "text_config")
        values = _known_fields(cls, raw, "text_config")
        rope = _section(raw, "rope_parameters")
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"unsupported rope_type {rope['rope_type']!r}: only 'default' RoPE is implemented")
        values["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", cls.rope_theta)))
        values["partial_rotary_factor"] = float(
            rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", cls.partial_rotary_factor))
        )
        cfg = cls(**values)
        if not cfg.layer_types:
            interval = int(raw.get("full_attention_interval", 4))
            cfg.layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(cfg.num_hidden_layers)
            ]
        if len(cfg.layer_types) != cfg.num_hidden_layers:
            raise CheckpointError(
                f"layer_types has {len(cfg.layer_types)} entries but num_hidden_layers is {cfg.num_hidden_layers}"
            )
        unknown = set(cfg.layer_types) - {"full_attention", "linear_attention"}
        if unknown:
            raise CheckpointError(f"unsupported layer types {sorted(unknown)}")
        return cfg


@dataclass
class ModelConfig:
    vision: VisionConfig
    text: TextConfig
    insert_layer_id: int = 6
    image_token_id: int | None = None
    video_token_id: int | None = None
    tie_word_embeddings: bool = False
    downsample_mode: str = "16x"
    merge_kernel_size: tuple[int, int] = (2, 2)
    merger_times: int = 1
    quantization: Any = None  # a quantized checkpoint's {"method", "group_size"} (model/quant.py)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        _check_model_type(raw, MODEL_TYPE, "config.json")
        vision = VisionConfig.from_dict(_section(raw, "vision_config"))
        text = TextConfig.from_dict(_section(raw, "text_config"))
        top = _known_fields(cls, raw, "config.json")
        top.pop("vision", None)
        top.pop("text", None)
        cfg = cls(vision=vision, text=text, **top)
        cfg.merge_kernel_size = tuple(cfg.merge_kernel_size)
        # The top-level value wins, as in the reference's __post_init__.
        cfg.vision.insert_layer_id = cfg.insert_layer_id
        if cfg.downsample_mode not in DOWNSAMPLE_MODES:
            raise CheckpointError(f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {cfg.downsample_mode!r}")
        if cfg.merger_times < 1:
            raise CheckpointError(f"merger_times must be >= 1, got {cfg.merger_times}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_dict(read_json(path))
        except (TypeError, ValueError) as exc:  # e.g. a rope_theta that is not a number
            raise CheckpointError(f"{path}: {exc}") from None
