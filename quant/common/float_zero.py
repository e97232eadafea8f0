"""Uniform codes with FLOAT zero points (HQQ, torchao's int4), run on the integer-zero kernels.

These formats dequantize w[n, k] = (q[n, k] - z[n, g]) * s[n, g] with z a float (HQQ's optimized
zero, torchao's zero in the weight's domain), which no canonical layout stores: GPTQLayout's
zero points are integers. Splitting z = zi + f with zi the nearest integer code keeps the matmul
on the fused kernels, exactly in exact arithmetic:

    w = (q - zi) * s  +  c,   c[n, g] = (zi - z) * s   (one value per group)
    x @ w^T = kernels.linear(x, GPTQLayout(q, s, zi))  +  (sum of x over each group) @ c^T

The second term costs one [.., G] x [G, N] product (G = K / group_size). Layers whose zeros are all
integers (c == 0) skip it. `dequantize()` is the format's own formula in its stored dtype, so a
rank's weight can be compared bit for bit with the package's dequantization.
"""

from __future__ import annotations

from typing import Callable

import torch

import kernels
from kernels.layouts import GPTQLayout
from kernels.packing import pack_int32, unpack_int32
from quant.base import _KEEP_LAYOUT, KernelLinear

LAYOUT_BITS = {1: 2, 2: 2, 3: 3, 4: 4, 5: 8, 6: 8, 8: 8}  # code width -> the GPTQLayout width holding it


def layout_bits(bits: int) -> int:
    return LAYOUT_BITS[bits]


def split_zero(zeros: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For w = (q - z) * s: (zi, c) with zi the nearest storable integer zero and c = (zi - z) * s,
    so that w = (q - zi) * s + c. Both [N, G]; zi int32, c float32."""
    zi = zeros.float().round().clamp(0, (1 << layout_bits(bits)) - 1)
    return zi.to(torch.int32), (zi - zeros.float()) * scales.float()


class FloatZeroLinear(KernelLinear):
    """codes [N, K] (unsigned ints < 2^bits), scales [N, G], integer zeros and per-group offsets
    [N, G] (w = (q - zi) * s + c), the group of each of the rank's K columns (`group_ids`, int64
    [K] in [0, G)), and `exact`: codes -> the float32 weight by the format's own formula (kept
    only where layouts are, for tests)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, int_zeros: torch.Tensor, offsets: torch.Tensor,
                 group_ids: torch.Tensor, group_size: int, bits: int, act_dtype: torch.dtype,
                 exact: Callable[[torch.Tensor], torch.Tensor] | None = None):
        n, k = codes.shape
        lbits = layout_bits(bits)
        trivial = k % group_size == 0 and bool(torch.equal(group_ids, torch.arange(k, device=codes.device) // group_size))
        layout = GPTQLayout(pack_int32(codes.T.to(torch.int32), lbits, 0), scales.T.contiguous(),
                            pack_int32(int_zeros.T.to(torch.int32), lbits, 1),
                            None if trivial else group_ids.to(torch.int32), lbits, group_size, k, n)
        super().__init__(layout, act_dtype)
        self.bits, self.group_size, self.num_groups = bits, group_size, scales.shape[1]
        self.register_buffer("group_ids", group_ids.long(), persistent=False)
        has_offsets = bool(offsets.ne(0).any())
        self.register_buffer("offsets", offsets.T.float().contiguous() if has_offsets else None, persistent=False)
        self.exact = exact if _KEEP_LAYOUT.get() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.prepared)
        if self.offsets is None:
            return y
        sums = x.new_zeros(x.shape[:-1] + (self.num_groups,), dtype=torch.float32)
        sums.index_add_(-1, self.group_ids, x.float())
        return y + (sums @ self.offsets).to(y.dtype)

    def dequantize(self) -> torch.Tensor:
        layout = self.prepared.layout
        if layout is None:
            raise RuntimeError("FloatZeroLinear was loaded without its layout (layouts_dropped)")
        if self.exact is None:
            w = super().dequantize()
            return w if self.offsets is None else w + self.offsets.T[:, self.group_ids]
        return self.exact(unpack_int32(layout.qweight, layout.bits, 0, count=self.in_features).T)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, float_zeros={self.offsets is not None}"
