"""The decoding state of one sequence: everything the language model needs to continue it.

Full-attention layers keep keys and values; Gated-DeltaNet layers keep the last ``kernel-1`` conv inputs and the
recurrent matrix. ``length`` is the number of tokens the state covers, so a copy taken at a token boundary can be
resumed later (the prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minicpmv.config import TextConfig


@dataclass
class HybridState:
    keys: list[torch.Tensor]  # per attention layer: [kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    conv: list[torch.Tensor]  # per DeltaNet layer: [conv_dim, kernel - 1], activation dtype
    recurrent: list[torch.Tensor]  # per DeltaNet layer: [v_heads, k_dim, v_dim], float32
    length: int = 0
    max_length: int | None = None  # the engine's reservation: the KV buffers never grow past it

    @classmethod
    def empty(cls, cfg: TextConfig, dtype: torch.dtype, device: torch.device | str, capacity: int = 256) -> HybridState:
        n_attn = cfg.layer_types.count("full_attention")
        n_delta = cfg.layer_types.count("linear_attention")
        kv_shape = (cfg.num_key_value_heads, capacity, cfg.head_dim)
        conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + (
            cfg.linear_num_value_heads * cfg.linear_value_head_dim
        )
        rec_shape = (cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        return cls(
            keys=[torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n_attn)],
            values=[torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(n_attn)],
            conv=[torch.zeros(conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=dtype, device=device) for _ in range(n_delta)],
            recurrent=[torch.zeros(rec_shape, dtype=torch.float32, device=device) for _ in range(n_delta)],
        )

    def append_kv(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ([kv_heads, n, head_dim]) after the covered tokens; return all keys and values so far."""
        start, n = self.length, k.shape[1]
        end = start + n
        cache_k, cache_v = self.keys[index], self.values[index]
        if end > cache_k.shape[1]:
            capacity = max(end, 2 * cache_k.shape[1])
            if self.max_length is not None:
                capacity = max(end, min(capacity, self.max_length))
            cache_k = _grow(cache_k, capacity, start)
            cache_v = _grow(cache_v, capacity, start)
            self.keys[index], self.values[index] = cache_k, cache_v
        cache_k[:, start:end] = k
        cache_v[:, start:end] = v
        return cache_k[:, :end], cache_v[:, :end]

    def clone(self) -> HybridState:
        """A deep copy holding only the covered tokens (a prefix-cache snapshot)."""
        n = max(self.length, 1)
        return HybridState(
            keys=[k[:, :n].clone() for k in self.keys],
            values=[v[:, :n].clone() for v in self.values],
            conv=[c.clone() for c in self.conv],
            recurrent=[r.clone() for r in self.recurrent],
            length=self.length,
            max_length=self.max_length,
        )

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.conv, *self.recurrent]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Snapshots:
    """States to keep from partway through a forward (for the prefix cache, without a forward of their own):
    ``at`` maps a sequence's index in the batch to a number of tokens inside its chunk; the model fills ``states``
    with a HybridState covering the tokens before that point (for each index of ``at`` whose chunk runs past it)."""

    at: dict[int, int]
    states: dict[int, HybridState] = field(default_factory=dict)


def _grow(t: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], capacity, t.shape[2])
    out[:, :keep] = t[:, :keep]
    return out
