"""A quantized weight as CPU backends repack it: unsigned codes, zeros and scales per sorted row.

Every integer layout reads as w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n] with rows sorted by
group (act-order rows permuted at load; x is permuted the same way per call): GPTQ and AWQ
directly, Int8Layout as q + 128 with z = 128 in a single group. Codes are produced a range of
output columns at a time, so repacking peaks at one chunk's temporaries, not the whole unpacked
weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.groups import plan_groups
from kernels.layouts import AWQLayout, GPTQLayout, Int8Layout
from kernels.packing import AWQ_ORDER, unpack_int32


@dataclass
class IntCodes:
    codes_of: Callable[[int, int], torch.Tensor]  # (n0, n1) -> int32 [K, n1 - n0], rows sorted
    group_ids: torch.Tensor  # int64 [K], group of each sorted row
    scales: torch.Tensor  # float32 [G, N]
    zeros: torch.Tensor  # float32 [G, N], true zero points
    bits: int
    perm: torch.Tensor | None  # sorted row i is stored row perm[i]; None: stored sorted


def int_codes(layout) -> IntCodes:
    K, N = layout.in_features, layout.out_features
    if isinstance(layout, GPTQLayout):
        plan = plan_groups(layout)
        perm, bits = plan.perm, layout.bits

        def codes_of(n0: int, n1: int) -> torch.Tensor:
            codes = unpack_int32(layout.qweight[:, n0:n1], bits, 0, count=K)
            return codes if perm is None else codes[perm]

        zeros = (torch.full_like(layout.scales, 2.0 ** (bits - 1), dtype=torch.float32) if layout.qzeros is None
                 else unpack_int32(layout.qzeros, bits, 1, count=N).float())
        return IntCodes(codes_of, plan.group_ids, layout.scales.float(), zeros, bits, perm)
    if isinstance(layout, AWQLayout):
        def codes_of(n0: int, n1: int) -> torch.Tensor:  # callers keep n0, n1 multiples of 8: whole words
            return unpack_int32(layout.qweight[:, n0 // 8: -(-n1 // 8)], 4, 1, count=n1 - n0, order=AWQ_ORDER)

        ids = torch.arange(K, device=layout.scales.device) // layout.group_size
        zeros = unpack_int32(layout.qzeros, 4, 1, count=N, order=AWQ_ORDER).float()
        return IntCodes(codes_of, ids, layout.scales.float(), zeros, 4, None)
    if isinstance(layout, Int8Layout):
        def codes_of(n0: int, n1: int) -> torch.Tensor:
            return (layout.weight[n0:n1].T.to(torch.int32) + 128)

        scales = layout.scales.float().reshape(1, N)
        return IntCodes(codes_of, torch.zeros(K, dtype=torch.int64), scales, torch.full_like(scales, 128.0), 8, None)
    raise TypeError(f"{type(layout).__name__} has no integer codes")
