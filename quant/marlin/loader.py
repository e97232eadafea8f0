"""Marlin-format checkpoints (`quant_method: "marlin"`, IST-DASLab marlin's packing, served by TGI
and vLLM): the loader.

Stored per layer (see quant.marlin.layout): `B` int32 [K/16, 2N], the tiled and shuffled 4-bit
codes, and `s` float [G, N], shuffled scales, G = K/128 or 1; symmetric, w = (q - 8) * s; no
g_idx, no zero points. The group size is 128 or -1 (one group), taken from the config when it says
and checked against each layer's `s` (TGI infers it from `s` alone).

Sharding: the rules table (parallel.sharding.CUTS, through `logical_ranges`) gives the rank's
ranges of N, K and groups, as for GPTQ. Marlin's storage is addressable in tiles of 16 input rows
x 64 output columns, so the rank reads the box of B covering its ranges (rounded out to tiles),
and of s the covering groups x covering 64-column runs; it unshuffles only that box, cuts its
exact slice and packs it as a standard `GPTQLayout` (4-bit, symmetric, g_idx where a row range
starts inside a group). Any TP size loads: misaligned slices cost at most one extra tile row at
each end of K and one extra 64-column run at each end of each block of N, never the whole tensor.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kernels.layouts import GPTQLayout
from kernels.packing import pack_int32
from parallel.sharding import Axis, Groups, LinearShard, TensorSource, local_group_ids, logical_length, \
    logical_ranges, tensor_name
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.config_fields import config_bool, config_field, config_int
from quant.common.packed_layers import dense_if_unquantized
from quant.marlin.layout import (BITS, CHUNK_N, GROUP_SIZES, TILE_K, WORDS_PER_COLUMN, ZERO, check_shape,
                                 decode_codes, decode_scales)

logger = logging.getLogger(__name__)

METHOD = "marlin"


@register(METHOD)
class MarlinLoader(WeightsLoader):
    method = METHOD

    def __init__(self, group_size: int | None):
        self.group_size = group_size  # None: read from each layer's s

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MarlinLoader":
        bits = config_int(config, ("bits", "w_bit"), BITS, METHOD)
        if bits != BITS:
            raise QuantConfigError(f"marlin quantization_config field bits={bits} is not supported; Marlin "
                                   f"checkpoints hold 4-bit codes")
        group_size = config_int(config, ("group_size",), None, METHOD)
        if group_size is not None and group_size not in GROUP_SIZES:
            raise QuantConfigError(f"marlin quantization_config field group_size={group_size} is not supported; "
                                   f"Marlin stores group_size 128 or -1 (one group)")
        fmt = config_field(config, ("checkpoint_format", "format"))
        if fmt is not None and str(fmt).lower() != METHOD:
            raise QuantConfigError(f"marlin quantization_config field checkpoint_format={fmt!r} is not supported; "
                                   f"supported: marlin (2:4-sparse marlin_24 stores B_24/B_meta)")
        if config_bool(config, ("lm_head",), METHOD):
            raise QuantConfigError("marlin quantization_config field lm_head=true (a quantized LM head) is not "
                                   "supported: qshard reads the LM head as a float lm_head.weight")
        if config_bool(config, ("sym",), METHOD) is False:
            raise QuantConfigError("marlin quantization_config field sym=false: Marlin is symmetric (zero point 8)")
        return cls(group_size)

    def describe(self) -> str:
        return f"marlin(bits=4, group_size={self.group_size if self.group_size is not None else 'per layer'})"

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        dense = dense_if_unquantized(weights, shard, "B", METHOD)
        if dense is not None:
            return dense
        group_size = self._layer_group_size(weights, shard)
        groups = Groups(group_size)
        codes, scales = [], []
        for src in shard.sources:
            c, s = _read_source(weights, shard, src, groups)
            codes.append(c)
            scales.append(s)
        gsize = groups.size_for(shard.in_features)
        g_idx = None
        if shard.k_start % gsize and groups.count(shard.in_features) > 1:
            g_idx = local_group_ids(shard, groups)  # the rank's rows start inside a group
        layout = GPTQLayout(pack_int32(torch.cat(codes, 1), BITS, 0), torch.cat(scales, 1).contiguous(), None, g_idx,
                            BITS, gsize, shard.local_in_features, shard.local_out_features)
        return KernelLinear(layout, weights.dtype)

    def _layer_group_size(self, weights: TensorSource, shard: LinearShard) -> int:
        """128 or -1 from the rows of every source's s (1 row: one group); checked against the config."""
        k = shard.in_features
        found = None
        for src in shard.sources:
            name = tensor_name(src, "s")
            if not weights.has(name):
                raise QuantConfigError(f"tensor {name} is missing from the marlin checkpoint")
            shape = list(weights.get_shape(name))
            rows = shape[0] if len(shape) == 2 else None
            size = -1 if rows == 1 else (128 if rows and rows * 128 == k else None)
            if size is None:
                raise QuantConfigError(f"tensor {name} has shape {shape}: for in_features={k} Marlin stores [1, N] "
                                       f"(group_size -1) or [{k / 128:g}, N] (group_size 128)")
            if self.group_size is not None and size != self.group_size:
                raise QuantConfigError(f"tensor {name} has {rows} group row(s), i.e. group_size {size}, but the "
                                       f"quantization_config says group_size={self.group_size} (in_features={k})")
            if found is not None and size != found:
                raise QuantConfigError(f"fused layers {list(shard.sources)} mix group sizes {found} and {size}")
            found = size
        return found


def _read_source(weights: TensorSource, shard: LinearShard, src: str,
                 groups: Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank's codes [K_local, n] and scales [G_local, n] of the blocks stored under `src`."""
    b_name, s_name = tensor_name(src, "B"), tensor_name(src, "s")
    k, n = shard.in_features, logical_length(shard, Axis.N, groups, src)
    try:
        check_shape(k, n, f"marlin layer {src}")
    except ValueError as e:
        raise QuantConfigError(str(e)) from None
    want_b = [k // TILE_K, n * WORDS_PER_COLUMN]
    if list(weights.get_shape(b_name)) != want_b or weights.get_dtype(b_name) != torch.int32:
        raise QuantConfigError(f"tensor {b_name} is {weights.get_dtype(b_name)} {list(weights.get_shape(b_name))}, "
                               f"expected int32 {want_b} (in_features/16, 2*out_features) for in_features={k}, "
                               f"out_features={n}")
    n_groups = groups.count(k)
    if list(weights.get_shape(s_name)) != [n_groups, n]:
        raise QuantConfigError(f"tensor {s_name} has shape {list(weights.get_shape(s_name))}, expected "
                               f"[{n_groups}, {n}] for out_features={n}")
    (k0, k1), = logical_ranges(shard, Axis.K, groups, src)
    (g0, g1), = logical_ranges(shard, Axis.G, groups, src)
    t0, t1 = k0 // TILE_K, -(-k1 // TILE_K)  # tile rows covering the rank's input rows
    codes, scales = [], []
    for a, b in logical_ranges(shard, Axis.N, groups, src):
        c0, c1 = a // CHUNK_N, -(-b // CHUNK_N)  # shuffled runs covering the block's columns
        words = CHUNK_N * WORDS_PER_COLUMN
        box = weights.read(b_name, (slice(t0, t1), slice(c0 * words, c1 * words)))
        cols = slice(a - c0 * CHUNK_N, b - c0 * CHUNK_N)
        codes.append(decode_codes(box)[k0 - t0 * TILE_K: k1 - t0 * TILE_K, cols])
        s_box = weights.read(s_name, (slice(g0, g1), slice(c0 * CHUNK_N, c1 * CHUNK_N)))
        scales.append(decode_scales(s_box, n_groups == 1)[:, cols])
    return torch.cat(codes, 1), torch.cat(scales, 1)
