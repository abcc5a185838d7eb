"""The SigLIP2 vision tower with NaViT packing and the mid-encoder 2x2 window-attention merger.

Input: the patches of several units (a source image, its slices, video frames) back to back, [L, 3*p*p], and
each unit's patch grid (h, w). Attention never crosses units. In 16x mode, after layer ``insert_layer_id`` every
2x2 window of patches is fused into one token, so later layers run on a quarter of the tokens; 4x mode skips it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minicpmv.config import VisionConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def position_ids(grids: list[tuple[int, int]], per_side: int, device: torch.device) -> torch.Tensor:
    """Nearest-bucket ids into the per_side x per_side position table for each (h, w) grid, concatenated.

    The float32 arithmetic (arange with a float step, int/int division) reproduces the reference's buckets.
    """
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side, device=device)
    ids = []
    for h, w in grids:
        bh = torch.bucketize(torch.arange(h, device=device) / h, boundaries, right=True)
        bw = torch.bucketize(torch.arange(w, device=device) / w, boundaries, right=True)
        ids.append((bh[:, None] * per_side + bw[None, :]).flatten())
    return torch.cat(ids)


def window_order(grids: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Token order that lists each unit's 2x2 windows in raster order, each window as TL, TR, BL, BR."""
    order, offset = [], 0
    for h, w in grids:
        if h % 2 or w % 2:
            raise ValueError(f"patch grid {h}x{w} is not divisible by the 2x2 merge window")
        idx = torch.arange(h * w, device=device).view(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3).flatten()
        order.append(idx + offset)
        offset += h * w
    return torch.cat(order)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """Bidirectional attention within each block of ``seqlens`` consecutive tokens of x [L, d]."""
        L = x.shape[0]
        q, k, v = (p(x).view(L, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        if len(set(seqlens)) == 1:  # equal blocks (merge windows, same-size slices): one batched call
            n = seqlens[0]
            q, k, v = (t.view(L // n, n, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(L, -1)
        else:
            parts, start = [], 0
            for n in seqlens:
                qs, ks, vs = (t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                parts.append(F.scaled_dot_product_attention(qs, ks, vs).squeeze(0).transpose(0, 1))
                start += n
            out = torch.cat(parts).reshape(L, -1)
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seqlens)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side**2, cfg.hidden_size)
        self.per_side = cfg.num_patches_per_side

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        # A stride-p conv over p x p patches is a matmul with the flattened (c, y, x) kernel.
        w = self.patch_embedding.weight
        x = F.linear(patches.to(w.dtype), w.flatten(1), self.patch_embedding.bias)
        return x + self.position_embedding(position_ids(grids, self.per_side, x.device))


class WindowMerger(nn.Module):
    """Attention inside each 2x2 window, then the window's 4 tokens -> 1 (MLP over the concat + their mean)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        k = cfg.window_kernel_size[0] * cfg.window_kernel_size[1]
        self.window = k
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.pre_norm = nn.LayerNorm(d * k, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(d * k, cfg.intermediate_size * k)
        self.linear_2 = nn.Linear(cfg.intermediate_size * k, d)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        order = window_order(grids, x.device)
        x = x[order] + self.self_attn(self.layer_norm1(x)[order], [self.window] * (x.shape[0] // self.window))
        windows = x.view(-1, self.window, x.shape[-1])
        fused = self.linear_2(gelu_tanh(self.linear_1(self.pre_norm(windows.flatten(1)))))
        return fused + windows.mean(1)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.vit_merger = WindowMerger(cfg)

    def forward(
        self, patches: torch.Tensor, grids: list[tuple[int, int]], use_window_merger: bool
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Returns the encoded tokens and the grids they now form (halved after the window merger)."""
        x = self.embeddings(patches, grids)
        merge_after = self.cfg.insert_layer_id if use_window_merger else -1
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, [h * w for h, w in grids])
            if i == merge_after:
                x = self.vit_merger(x, grids)
                grids = [(h // 2, w // 2) for h, w in grids]
        return self.post_layernorm(x), grids
