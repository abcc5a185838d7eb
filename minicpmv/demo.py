"""Write a complete random-weight checkpoint directory: for tests, demos and benchmarks without the real weights.

``full`` is the real 1.3B architecture (the official config.json); ``tiny`` keeps every structural feature (hybrid
layers, window merger, GQA) at a width that runs in milliseconds. Both get the real tokenizer, chat template,
processor and generation configs, so everything but the answers behaves like the official checkpoint.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minicpmv.config import ModelConfig
from minicpmv.model.deltanet import GatedRMSNorm
from minicpmv.model.language import RMSNorm
from minicpmv.model.minicpmv import MiniCPMV

TINY_OVERRIDES = {
    "insert_layer_id": 1,
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    },
}


def official_config() -> dict:
    return json.loads(resources.files("minicpmv.assets").joinpath("config.json").read_text())


def demo_config(size: str) -> dict:
    raw = official_config()
    if size == "full":
        return raw
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    for key, value in TINY_OVERRIDES.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return raw


def random_weights(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Weights with the checkpoint's names: N(0, 0.02) matrices, identity norms, DeltaNet decays in a sane range."""
    with torch.device("meta"):
        model = MiniCPMV(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}"
            if isinstance(module, RMSNorm):
                t = torch.zeros(p.shape)  # zero-centred: (1 + 0) is the identity
            elif isinstance(module, (nn.LayerNorm, GatedRMSNorm)):
                t = torch.ones(p.shape) if leaf == "weight" else torch.zeros(p.shape)
            elif leaf == "A_log":
                t = torch.empty(p.shape).uniform_(1.0, 16.0, generator=g).log()
            elif leaf in ("dt_bias",):
                t = torch.ones(p.shape)
            elif leaf == "bias":
                t = torch.zeros(p.shape)
            else:
                t = torch.empty(p.shape).normal_(0.0, 0.02, generator=g)
            out[name] = t.to(dtype)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def write_demo_checkpoint(directory: str | Path, size: str = "tiny", dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer/processor files into ``directory``."""
    from minicpmv.processing.tokenizer_build import write_tokenizer_files

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = demo_config(size)
    cfg = ModelConfig.from_dict(raw)
    weights = random_weights(cfg, getattr(torch, dtype), seed)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**raw, "demo_random_weights": True}, indent=2))
    write_tokenizer_files(directory)
    return directory
