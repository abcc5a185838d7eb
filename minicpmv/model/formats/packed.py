"""What GPTQ and AWQ share: integers packed into int32 words, zero points and scales per group along the input
dim, and turning one such linear into dense weights or into our kernels' asymmetric int4 (``quant.Grouped``)."""

from __future__ import annotations

import torch

from minicpmv.model import quant

KERNEL_GROUPS = (32, 64, 128)  # group sizes the int4 path takes (others are dequantized)


def unpack(words: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """The unsigned ``bits``-bit fields of int32 ``words``, slot s of each word at index word * (32 / bits) + s
    along ``dim`` (or at ``order[s]`` within the word's run: AWQ's interleave). int16 result."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32).movedim(dim, -1)
    fields = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.int16)  # [..., words, per]
    if order is not None:
        fields = fields[..., torch.argsort(torch.tensor(order))]
    return fields.flatten(-2).movedim(-1, dim)


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """W [N, K] float32 = (q - z) s, with q [K, N], zeros and scales [G, N] and each input's group ``groups`` [K]."""
    return ((q.float() - zeros.float()[groups]) * scales.float()[groups]).t().contiguous()


def contiguous_groups(groups: torch.Tensor, k: int) -> int | None:
    """The group size when input k belongs to group k // size for every k (ours and GPTQ without act-order), else
    None."""
    if k == 0 or groups.numel() != k:
        return None
    size = int((groups == 0).sum())
    if size == 0 or not torch.equal(groups.long(), torch.arange(k) // size):
        return None
    return size


def to_int4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int,
            perm: torch.Tensor | None = None) -> quant.Grouped:
    """(q - z) s in groups of ``group`` inputs as our asymmetric int4: values q - 8, scales s, offsets s (8 - z)
    (q [K, N] in 0..15, zeros and scales [G, N]). ``perm``: the inputs in group order (act-order), q's rows taken
    in that order."""
    s = scales.float()
    if perm is not None:
        q = q[perm]
    return quant.Grouped(values=(q.t() - 8).to(torch.int8).contiguous(), scales=s.t().contiguous(),
                      offsets=(s * (8 - zeros.float())).t().contiguous(), group=group, perm=perm)


def group_order(groups: torch.Tensor, k: int) -> tuple[int, torch.Tensor] | None:
    """For act-order groups (each input's group in any order, every group the same size): (size, the inputs in
    group order) so that the groups become contiguous; None when the groups are not of one size."""
    if groups.numel() != k:
        return None
    perm = torch.argsort(groups, stable=True)
    size = contiguous_groups(groups[perm], k)
    return None if size is None else (size, perm)
