"""AWQ checkpoints (AutoAWQ / transformers, GEMM packing): the loader.

Stored per layer (K in-features, N out-features, G = K / group_size groups), 4-bit only:
    qweight int32 [K, N / 8]  codes packed along N, slot i of a word holding column AWQ_ORDER[i]
    qzeros  int32 [G, N / 8]  TRUE zero points, same packing
    scales  float [G, N]
No g_idx: group of row k is k // group_size. A rank whose rows start on a group boundary keeps an
`AWQLayout`; a row-parallel rank starting inside a group (K / TP not a multiple of the group
size) is converted, exactly, to a `GPTQLayout` with an explicit rebased g_idx, which AWQLayout
cannot carry.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kernels.layouts import AWQLayout, GPTQLayout
from kernels.packing import AWQ_ORDER, pack_int32, unpack_int32
from parallel.sharding import Axis, Groups, LinearShard, Role, TensorSource, local_group_ids, read_shard
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.config_fields import config_bool, config_field, config_int
from quant.common.packed_layers import check_group_size, check_stored, dense_if_unquantized, effective_group_size

logger = logging.getLogger(__name__)

BITS = 4
VERSIONS = ("gemm",)
QWEIGHT = Role("qweight", (Axis.K, Axis.N), packed_dim=1, bits=BITS, order=AWQ_ORDER)
QZEROS = Role("qzeros", (Axis.G, Axis.N), packed_dim=1, bits=BITS, order=AWQ_ORDER)
SCALES = Role("scales", (Axis.G, Axis.N))


@register("awq")
class AWQLoader(WeightsLoader):
    method = "awq"

    def __init__(self, group_size: int):
        self.group_size = group_size

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQLoader":
        # transformers writes bits / group_size / version; AutoAWQ's own configs w_bit / q_group_size.
        bits = config_int(config, ("bits", "w_bit"), BITS, "awq")
        if bits != BITS:
            raise QuantConfigError(f"awq quantization_config field bits={bits} is not supported; supported: 4")
        group_size = config_int(config, ("group_size", "q_group_size"), 128, "awq")
        check_group_size(group_size, "awq")
        version = config_field(config, ("version", "format"), "gemm")
        if not isinstance(version, str) or version.lower() not in VERSIONS:
            raise QuantConfigError(f"awq quantization_config field version={version!r} is not supported; supported: "
                                   f"{', '.join(VERSIONS)} (GEMV and other packings store a different layout)")
        if config_bool(config, ("zero_point",), "awq") is False:
            raise QuantConfigError("awq quantization_config field zero_point=false is not supported; supported: "
                                   "zero_point=true (GEMM checkpoints with stored zero points)")
        return cls(group_size)

    def describe(self) -> str:
        return f"awq(bits=4, group_size={self.group_size}, version=gemm)"

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        dense = dense_if_unquantized(weights, shard, "qweight", self.method)
        if dense is not None:
            return dense
        gsize = effective_group_size(shard, self.group_size, self.method)
        groups = Groups(self.group_size)
        check_stored(weights, (QWEIGHT, QZEROS, SCALES), shard, groups, self.method, BITS)
        qweight = read_shard(weights, QWEIGHT, shard, groups)
        qzeros = read_shard(weights, QZEROS, shard, groups)
        scales = read_shard(weights, SCALES, shard, groups)
        k, n = shard.local_in_features, shard.local_out_features
        if shard.k_start % gsize == 0:
            return KernelLinear(AWQLayout(qweight, scales, qzeros, gsize, k, n), weights.dtype)
        logger.debug("awq: %s rank %d starts inside a group (row %d, group size %d): GPTQ layout with a rebased g_idx",
                     shard.prefix, shard.rank, shard.k_start, gsize)
        layout = awq_as_gptq(qweight, qzeros, scales, local_group_ids(shard, groups), gsize, k, n)
        return KernelLinear(layout, weights.dtype)


def awq_as_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                group_size: int, in_features: int, out_features: int) -> GPTQLayout:
    """The same weight in GPTQ packing: codes re-packed along K, zeros re-packed without AWQ order."""
    codes = unpack_int32(qweight, BITS, 1, count=out_features, order=AWQ_ORDER)  # [K, N]
    zeros = unpack_int32(qzeros, BITS, 1, count=out_features, order=AWQ_ORDER)  # [G, N]
    return GPTQLayout(pack_int32(codes, BITS, 0), scales, pack_int32(zeros, BITS, 1), g_idx, BITS, group_size,
                      in_features, out_features)
