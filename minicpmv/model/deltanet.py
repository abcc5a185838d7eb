"""Gated DeltaNet: the linear-attention token mixer of 18 of the 24 Qwen3.5 layers.

Per head the layer keeps a matrix state S [k_dim, v_dim]. For each token t (all maths in float32):
    S <- exp(g_t) * S
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T        (the delta rule)
    o_t = S^T q_t
Prefill uses the chunked form (WY representation, chunks of 64) so the work is a few matmuls per chunk; decode
uses the recurrence directly, batched over sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minicpmv.config import TextConfig

CHUNK = 64


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def chunked_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [H, T, dk] (normalised, q scaled); v: [H, T, dv]; g, beta: [H, T]; state: [H, dk, dv]. All float32.

    Returns the outputs [H, T, dv] and the final state.
    """
    H, T, dk = k.shape
    pad = (-T) % CHUNK
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // CHUNK
    q, k, v = (x.reshape(H, n, CHUNK, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(H, n, CHUNK), beta.reshape(H, n, CHUNK)

    cum = g.cumsum(-1)  # log of the decay from the chunk start to each position
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # [H, n, C, C]
    k_beta = k * beta.unsqueeze(-1)
    # Solve (I + strictly_lower(beta k k^T * decay)) [u | w] = [beta v | beta k exp(cum)] for all chunks at once.
    system = (k_beta @ k.transpose(-1, -2)) * decay
    rhs = torch.cat([v * beta.unsqueeze(-1), k_beta * cum.exp().unsqueeze(-1)], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = solved[..., : v.shape[-1]], solved[..., v.shape[-1] :]
    intra = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * cum.exp().unsqueeze(-1)
    k_to_end = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [H, n, 1, 1]

    out = torch.empty_like(u)
    for i in range(n):
        v_new = u[:, i] - w[:, i] @ state
        out[:, i] = q_decayed[:, i] @ state + intra[:, i] @ v_new
        state = state * chunk_decay[:, i] + k_to_end[:, i].transpose(-1, -2) @ v_new
    return out.reshape(H, n * CHUNK, -1)[:, :T], state


def recurrent_delta_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for a batch: q, k [B, H, dk]; v [B, H, dv]; g, beta [B, H]; state [B, H, dk, dv]. Float32."""
    state = state * g.exp()[..., None, None]
    predicted = (state * k.unsqueeze(-1)).sum(-2)
    delta = (v - predicted) * beta.unsqueeze(-1)
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    out = (state * q.unsqueeze(-1)).sum(-2)
    return out, state


class GatedRMSNorm(nn.Module):
    """RMSNorm with a plain (not zero-centred) weight, gated by silu(z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(dtype) * F.silu(z.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.k_heads, self.v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.k_heads * self.dk, self.v_heads * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = cfg.linear_conv_kernel_dim
        d = cfg.hidden_size
        self.in_proj_qkv = nn.Linear(d, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(d, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(d, self.v_heads, bias=False)
        self.in_proj_a = nn.Linear(d, self.v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d, bias=False)
        # Set by fast.optimize (bf16 on the CPU): the four input projections as one matmul, and everything from
        # them to out_proj as one kernel.
        self.fused_proj: nn.Module | None = None
        self.fused_forward = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused_proj is not None:
            return self.fused_proj(x)
        return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)

    def _conv(self, x: torch.Tensor, conv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv of x [n, conv_dim] continuing from conv_state [conv_dim, kernel-1]."""
        seq = torch.cat([conv_state, x.transpose(0, 1).to(conv_state.dtype)], dim=1)
        w = self.conv1d.weight
        out = F.conv1d(seq.unsqueeze(0).to(w.dtype), w, groups=self.conv_dim).squeeze(0)
        return F.silu(out).transpose(0, 1).to(x.dtype), seq[:, -(self.kernel - 1) :]

    def _heads(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split conv output [..., conv_dim] into float32 q, k [..., v_heads, dk] and v [..., v_heads, dv]."""
        q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        lead = mixed.shape[:-1]
        q, k = (x.reshape(*lead, self.k_heads, self.dk).float() for x in (q, k))
        v = v.reshape(*lead, self.v_heads, self.dv).float()
        if self.v_heads != self.k_heads:
            rep = self.v_heads // self.k_heads
            q, k = q.repeat_interleave(rep, dim=-2), k.repeat_interleave(rep, dim=-2)
        q = l2_normalize(q) * self.dk**-0.5
        return q, l2_normalize(k), v

    def forward(self, x: torch.Tensor, lengths: list[int], conv: list[torch.Tensor], rec: list[torch.Tensor],
                cuts: dict[int, int] | None = None, captured: dict | None = None):
        """x: [N, d], the tokens of several sequences back to back (``lengths``). ``conv`` and ``rec`` hold each
        sequence's state and are replaced in place by the new states. For each ``cuts`` entry (sequence index ->
        token count, 0 < count < its length) ``captured[index]`` gets copies of (conv, rec) after those tokens."""
        cuts = cuts or {}
        if self.fused_forward is not None:
            return self.fused_forward(self, x, lengths, conv, rec, cuts, captured)
        mixed, z, b, a = self.project(x)
        beta = b.sigmoid().float()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        core = torch.empty(x.shape[0], self.v_heads, self.dv, dtype=x.dtype, device=x.device)

        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        steps = [i for i, n in enumerate(lengths) if n == 1]
        if steps:  # one-token sequences: batched recurrence
            rows = torch.tensor([offsets[i] for i in steps], device=x.device)
            outs, states = [], []
            for i in steps:
                out, conv[i] = self._conv(mixed[offsets[i] : offsets[i] + 1], conv[i])
                outs.append(out)
            q, k, v = self._heads(torch.cat(outs))
            state = torch.stack([rec[i] for i in steps])
            o, state = recurrent_delta_step(q, k, v, g[rows], beta[rows], state)
            core[rows] = o.to(x.dtype)
            for j, i in enumerate(steps):
                rec[i] = state[j]
        for i, n in enumerate(lengths):
            if n == 1:
                continue
            for lo, hi in ((0, cuts[i]), (cuts[i], n)) if i in cuts else ((0, n),):
                s = slice(offsets[i] + lo, offsets[i] + hi)
                out, conv[i] = self._conv(mixed[s], conv[i])
                q, k, v = (t.transpose(0, 1) for t in self._heads(out))
                o, rec[i] = chunked_delta_rule(q, k, v, g[s].T, beta[s].T, rec[i])
                core[s] = o.transpose(0, 1).to(x.dtype)
                if i in cuts and hi == cuts[i]:
                    captured[i] = (conv[i].clone(), rec[i].clone())

        core = self.norm(core.reshape(-1, self.dv), z.reshape(-1, self.dv)).reshape(x.shape[0], -1)
        return self.out_proj(core)
