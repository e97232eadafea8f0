"""Plain-torch dequantization of every layout: the oracle that kernels are tested against."""

from __future__ import annotations

import torch

from kernels.layouts import AWQLayout, CodebookLayout, FP8Layout, GPTQLayout, Int8Layout, LUT4Layout
from kernels.packing import AWQ_ORDER, unpack_int32


def gptq_group_ids(layout: GPTQLayout) -> torch.Tensor:
    if layout.g_idx is not None:
        return layout.g_idx.long()
    return torch.arange(layout.in_features, device=layout.scales.device) // layout.group_size


def dequantize(layout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as [N, K] (nn.Linear orientation) in `dtype`."""
    if isinstance(layout, GPTQLayout):
        K, N = layout.in_features, layout.out_features
        q = unpack_int32(layout.qweight, layout.bits, 0, count=K).to(dtype)  # [K, N]
        g = gptq_group_ids(layout)
        if layout.qzeros is None:
            z = torch.full((K, N), float(2 ** (layout.bits - 1)), dtype=dtype, device=q.device)
        else:
            z = unpack_int32(layout.qzeros, layout.bits, 1, count=N).to(dtype)[g]
        return ((q - z) * layout.scales.to(dtype)[g]).T.contiguous()
    if isinstance(layout, AWQLayout):
        K, N = layout.in_features, layout.out_features
        q = unpack_int32(layout.qweight, 4, 1, count=N, order=AWQ_ORDER).to(dtype)
        g = torch.arange(K, device=q.device) // layout.group_size
        z = unpack_int32(layout.qzeros, 4, 1, count=N, order=AWQ_ORDER).to(dtype)[g]
        return ((q - z) * layout.scales.to(dtype)[g]).T.contiguous()
    if isinstance(layout, Int8Layout):
        return layout.weight.to(dtype) * layout.scales.to(dtype)[:, None]
    if isinstance(layout, FP8Layout):
        s = layout.scales.to(dtype)
        return layout.weight.to(dtype) * (s if s.dim() == 0 else s[:, None])
    if isinstance(layout, LUT4Layout):
        codes = torch.stack((layout.qweight >> 4, layout.qweight & 15), -1).reshape(layout.out_features, -1).long()
        absmax = layout.absmax.float().repeat_interleave(layout.blocksize, 1)
        return (layout.table.float()[codes] * absmax).to(dtype)  # float32 product, as bitsandbytes computes it
    if isinstance(layout, CodebookLayout):
        from kernels.codebook_matmul import dequantize_codebook  # the codebook decode lives with its kernel

        return dequantize_codebook(layout, dtype)
    raise TypeError(f"no reference dequantization for {type(layout).__name__}")


def reference_matmul(x: torch.Tensor, layout, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x @ W^T computed in `dtype` (float64 for tests)."""
    return (x.to(dtype) @ dequantize(layout, dtype).T)
