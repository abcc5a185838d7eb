"""The projector: 2x2 neighbouring vision tokens -> one language-model embedding (``merger_times`` rounds)."""

from __future__ import annotations

import torch
from torch import nn

from minicpmv.config import ModelConfig


class DownsampleMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(4 * in_dim, eps=1e-6)
        self.linear_1 = nn.Linear(4 * in_dim, 4 * in_dim)
        self.act = nn.GELU()  # exact erf GELU here, unlike the tanh GELU inside the vision tower
        self.linear_2 = nn.Linear(4 * in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(x))))


def group_2x2(x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """[sum(h*w), d] in raster order per grid -> [sum(h*w)/4, 4d], each row a 2x2 block as TL, TR, BL, BR."""
    parts, start = [], 0
    for h, w in grids:
        if h % 2 or w % 2:
            raise ValueError(f"patch grid {h}x{w} is not divisible by the 2x2 merge kernel")
        block = x[start : start + h * w].view(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4)
        parts.append(block.reshape(h * w // 4, -1))
        start += h * w
    return torch.cat(parts)


class Merger(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if tuple(cfg.merge_kernel_size) != (2, 2):
            raise ValueError(f"only a 2x2 merge kernel is supported, got {cfg.merge_kernel_size}")
        d, out = cfg.vision.hidden_size, cfg.text.hidden_size
        self.mlp = nn.ModuleList(DownsampleMLP(d, d) for _ in range(cfg.merger_times - 1))
        self.mlp.append(DownsampleMLP(d, out))

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        for mlp in self.mlp:
            x = mlp(group_2x2(x, grids))
            grids = [(h // 2, w // 2) for h, w in grids]
        return x
