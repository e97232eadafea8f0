"""CPU backend for GPTQ (2/3/4-bit, and 8-bit as two 4-bit halves) and AWQ: torch's int4 op in bf16.

`_weight_int4pack_mm_for_cpu(x, packed, block, scale_and_offset)` computes, for every run of
`block` rows (32, 64, 128 or 256), w = (q - 8) * scale + offset with 4-bit q; it is fast only
with bf16 x. GPTQ/AWQ's w = (q - z) * s is that with scale s and offset (8 - z) * s; 2- and 3-bit
codes are valid 4-bit codes. An 8-bit code q = 16h + l is two 4-bit rows sharing one x column:
(q - z) s = (h - 8) 16s + (l - 8) s + (136 - z) s, so the weight becomes [N, 2K] and x is
duplicated along K per call.

Act-order rows are sorted by group at load and x is permuted once per call. Unequal groups (a
misaligned tensor-parallel shard) work when every run of `block` sorted rows lies in one group.
"""

from __future__ import annotations

import torch

from kernels.codes import int_codes
from kernels.groups import aligned_block
from kernels.layouts import AWQLayout, GPTQLayout
from kernels.prepared import PreparedWeight

# Output rows converted at a time: the op packs rows independently in runs of 64, so chunks of
# 256 rows concatenate to the whole tensor's conversion bit for bit (checked on torch 2.13).
CHUNK_N = 256


def unsupported_reason(layout, act_dtype: torch.dtype) -> str | None:
    """Why this backend cannot run `layout` (None: it can)."""
    if act_dtype != torch.bfloat16:
        return f"the CPU int4 op is fast only in bfloat16, not {act_dtype}"
    if not isinstance(layout, (GPTQLayout, AWQLayout)):
        return f"{type(layout).__name__} is not GPTQ/AWQ"
    if layout.scales.device.type != "cpu":
        return "weights are not on the CPU"
    if layout.out_features % 16:
        return f"N={layout.out_features} is not a multiple of 16"
    if isinstance(layout, GPTQLayout) and layout.bits not in (2, 3, 4, 8):
        return f"{layout.bits}-bit codes"
    if aligned_block(int_codes(layout).group_ids) is None:
        return "no run of 32/64/128/256 rows stays within one group (or K is not a multiple of 32)"
    return None


class CpuInt4Weight(PreparedWeight):
    backend = "cpu-int4"

    def __init__(self, layout, act_dtype: torch.dtype):
        super().__init__(layout, act_dtype)
        reason = unsupported_reason(layout, act_dtype)
        if reason:
            raise ValueError(f"cpu-int4 backend: {reason}")
        N = layout.out_features
        src = int_codes(layout)
        ids, bits, perm, codes_of = src.group_ids, src.bits, src.perm, src.codes_of
        self.block = aligned_block(ids)
        block_groups = ids[:: self.block]
        s, z = src.scales[block_groups], src.zeros[block_groups]  # [K / block, N]
        if bits == 8:
            scale = torch.cat([16 * s, s])
            offset = torch.cat([(136 - z) * s, torch.zeros_like(s)])
        else:
            scale, offset = s, (8 - z) * s
        self.split_bytes = bits == 8
        # Unpacked codes take 4-8 bytes each: convert CHUNK_N output rows at a time so that loading
        # peaks at the packed weight plus one chunk's temporaries, not ~20x the packed weight.
        packed = []
        for n0 in range(0, N, CHUNK_N):
            codes = codes_of(n0, min(N, n0 + CHUNK_N))
            if bits == 8:
                codes = torch.cat([codes >> 4, codes & 15])  # high nibbles' rows, then low nibbles'
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.T.contiguous().to(torch.int32), 1))
            del codes
        self.register_buffer("packed", packed[0] if len(packed) == 1 else torch.cat(packed), persistent=False)
        self.register_buffer("scale_and_offset", torch.stack([scale, offset], -1).to(act_dtype).contiguous(),
                             persistent=False)
        self.register_buffer("perm", perm, persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.split_bytes:
            x = torch.cat([x, x], -1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.block,
                                                          self.scale_and_offset)
