"""CPU backend for per-channel 8-bit weights: torch's `_weight_int8pack_mm` in bf16.

The op computes x @ (q * s[n])^T with int8 q [N, K] and K a multiple of 16 (other K give wrong
results or crash in torch 2.13). It serves Int8Layout directly and GPTQ 8-bit with a single
group: (q - z) s = (q - 128) s + (128 - z) s, the second term added per call as
rowsum(x) * offset[n] (absent when symmetric, z = 128).
"""

from __future__ import annotations

import torch

from kernels.groups import plan_groups
from kernels.layouts import GPTQLayout, Int8Layout
from kernels.packing import unpack_int32
from kernels.prepared import PreparedWeight


def unsupported_reason(layout, act_dtype: torch.dtype) -> str | None:
    if act_dtype != torch.bfloat16:
        return f"the CPU int8 op is fast only in bfloat16, not {act_dtype}"
    if isinstance(layout, GPTQLayout):
        if layout.bits != 8:
            return f"{layout.bits}-bit GPTQ"
        if int(plan_groups(layout).group_ids.unique().numel()) != 1:
            return "more than one group (scales are per channel only)"
    elif not isinstance(layout, Int8Layout):
        return f"{type(layout).__name__} is not int8"
    if layout.scales.device.type != "cpu":
        return "weights are not on the CPU"
    if layout.in_features % 16:
        return f"K={layout.in_features} is not a multiple of 16"
    return None


class CpuInt8Weight(PreparedWeight):
    backend = "cpu-int8"

    def __init__(self, layout, act_dtype: torch.dtype):
        super().__init__(layout, act_dtype)
        reason = unsupported_reason(layout, act_dtype)
        if reason:
            raise ValueError(f"cpu-int8 backend: {reason}")
        offset = None
        if isinstance(layout, Int8Layout):
            weight, scales = layout.weight, layout.scales.float()
        else:
            K, N = layout.in_features, layout.out_features
            group = int(plan_groups(layout).group_ids[0])
            codes = unpack_int32(layout.qweight, 8, 0, count=K)  # [K, N], one group: row order is free
            weight = (codes - 128).T.contiguous().to(torch.int8)
            scales = layout.scales[group].float()
            if layout.qzeros is not None:
                z = unpack_int32(layout.qzeros, 8, 1, count=N)[group].float()
                offset = (128 - z) * scales  # float32: it cancels against y
        if weight.data_ptr() % 64 or not weight.is_contiguous():
            # torch 2.13's op segfaults on int8 weights not 64-byte aligned (a safetensors read can
            # start anywhere); torch's CPU allocator aligns fresh tensors
            weight = weight.contiguous().clone()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales", scales.to(act_dtype), persistent=False)
        self.register_buffer("offset", offset, persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        if self.offset is not None:
            rowsum = x.sum(-1, keepdim=True, dtype=torch.float32)
            y = torch.addcmul(y.float(), rowsum, self.offset).to(y.dtype)
        return y
