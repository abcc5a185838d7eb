"""The Qwen3.5 hybrid language model: 3 Gated-DeltaNet layers, then 1 gated full-attention layer, repeated.

Every forward takes a ragged batch: the tokens of several sequences back to back ([N, hidden]) and one
``HybridState`` per sequence. A sequence contributes any number of tokens (a prefill chunk or one decode token);
its positions continue from ``state.length``. Positions are plain 1-D, visual tokens included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minicpmv.config import TextConfig
from minicpmv.model.deltanet import GatedDeltaNet
from minicpmv.model.state import HybridState, Snapshots


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: the stored weight w scales by (1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Rotary:
    """Partial RoPE on the first ``rotary_dim`` dims of each head (rotate-half layout)."""

    def __init__(self, cfg: TextConfig):
        dim = cfg.rotary_dim
        # Built on the CPU even when the model is created on the meta device.
        exponents = torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim
        self.inv_freq = 1.0 / (cfg.rope_theta**exponents)
        self.dim = dim

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [n, heads, head_dim]; cos, sin: [n, rotary_dim]."""
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = self.dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        rot = rot * cos[:, None] + rotated * sin[:, None]
        return torch.cat([rot, rest], dim=-1)


class GatedAttention(nn.Module):
    """Causal GQA attention with q/k RMSNorm, partial RoPE and a sigmoid output gate from q_proj."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.fused_proj: nn.Module | None = None  # set by fast.optimize: q, k and v as one matmul

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused_proj is not None:
            return self.fused_proj(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rotary: Rotary, cos, sin, lengths: list[int], states: list[HybridState], index: int):
        n = x.shape[0]
        q, k, v = self.project(x)
        q, gate = q.view(n, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = rotary.apply(self.q_norm(q), cos, sin)
        k = rotary.apply(self.k_norm(k.view(n, self.kv_heads, self.head_dim)), cos, sin)
        v = v.view(n, self.kv_heads, self.head_dim)
        out = torch.empty_like(q)
        start = 0
        for length, state in zip(lengths, states):
            s = slice(start, start + length)
            keys, values = state.append_kv(index, k[s].transpose(0, 1), v[s].transpose(0, 1))
            qs = q[s].transpose(0, 1)  # [heads, length, head_dim]
            past = state.length
            mask = None
            if length > 1 and past:  # query i sits at position past + i and sees keys 0..past + i
                mask = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(past)
            o = F.scaled_dot_product_attention(  # (is_causal where it means the same: it skips the masked blocks)
                qs.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask,
                is_causal=length > 1 and not past, enable_gqa=True,
            )
            out[s] = o.squeeze(0).transpose(0, 1)
            start += length
        out = out.reshape(n, -1) * torch.sigmoid(gate.reshape(n, -1))
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = GatedAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        # Index of each layer within its own kind: where its slot lives in a HybridState.
        self.slot = [cfg.layer_types[:i].count(t) for i, t in enumerate(cfg.layer_types)]
        self.fused_decode = None  # set by fast.optimize (bf16 on the CPU): a whole decode step in one kernel

    def forward(self, hidden: torch.Tensor, lengths: list[int], states: list[HybridState],
                snapshots: Snapshots | None = None) -> torch.Tensor:
        """hidden: [N, d] input embeddings of ``len(states)`` sequences back to back. Advances every state, and
        fills ``snapshots`` with the states it asks for partway through a chunk."""
        cuts = {i: n for i, n in (snapshots.at.items() if snapshots else ()) if 0 < n < lengths[i]}
        if self.fused_decode is not None and max(lengths) == 1:
            return self.fused_decode(self, hidden, states)
        captured = {i: [] for i in cuts}  # sequence index -> each DeltaNet layer's (conv, rec) at the cut
        positions = torch.cat(
            [torch.arange(s.length, s.length + n, device=hidden.device) for n, s in zip(lengths, states)]
        )
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        for layer, slot in zip(self.layers, self.slot):
            h = layer.input_layernorm(hidden)
            if layer.layer_type == "linear_attention":
                conv = [s.conv[slot] for s in states]
                rec = [s.recurrent[slot] for s in states]
                at_cut = {}
                h = layer.linear_attn(h, lengths, conv, rec, cuts, at_cut)
                for s, c, r in zip(states, conv, rec):
                    s.conv[slot], s.recurrent[slot] = c, r
                for i, pair in at_cut.items():
                    captured[i].append(pair)
            else:
                h = layer.self_attn(h, self.rotary, cos, sin, lengths, states, slot)
            hidden = hidden + h
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        for i, layers in captured.items():  # attention layers: the keys and values before the cut, copied
            length = states[i].length + cuts[i]
            snapshots.states[i] = HybridState(
                keys=[k[:, :length].clone() for k in states[i].keys],
                values=[v[:, :length].clone() for v in states[i].values],
                conv=[c for c, _ in layers], recurrent=[r for _, r in layers], length=length)
        for n, s in zip(lengths, states):
            s.length += n
        return self.norm(hidden)
