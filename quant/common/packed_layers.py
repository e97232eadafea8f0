"""Checks shared by the formats that store int32-packed codes with group scales (GPTQ, AWQ, Marlin,
exl2, ...): group size against in_features, stored tensors against the config (naming the tensor
and the config value behind a mismatch), and the dense fallback for layers a checkpoint leaves in
float."""

from __future__ import annotations

from typing import Iterable

import torch

from kernels.packing import packed_size
from parallel.sharding import (Axis, Groups, LinearShard, Role, TensorSource, expected_shape, logical_length,
                               tensor_name)
from quant.base import PackedLinear, QuantConfigError
from quant.common.dense import load_dense

PACKED_BITS = (2, 3, 4, 8)


def check_group_size(group_size: int, method: str) -> None:
    if group_size != -1 and group_size < 1:
        raise QuantConfigError(f"{method} quantization_config field group_size={group_size} is invalid; "
                               f"use a positive size, or -1 for one group over all input features")


def effective_group_size(shard: LinearShard, group_size: int, method: str) -> int:
    """Rows of K per group for this layer (K itself for group_size -1); it must divide K."""
    k = shard.in_features
    if group_size == -1:
        return k
    if k % group_size:
        raise QuantConfigError(f"{method} group_size={group_size} does not divide in_features={k} of layer "
                               f"{shard.prefix}: the checkpoint does not match its quantization_config")
    return group_size


def dense_if_unquantized(weights: TensorSource, shard: LinearShard, marker: str, method: str) -> PackedLinear | None:
    """A DenseLinear when every part of the layer is stored as a float `.weight` without `marker`
    (lm_head, modules_to_not_convert); None when every part is quantized; an error otherwise."""
    quantized = [weights.has(tensor_name(src, marker)) for src in shard.sources]
    if all(quantized):
        return None
    dense = [weights.has(tensor_name(src, "weight")) for src in shard.sources]
    if not any(quantized) and all(dense):
        return load_dense(weights, shard)
    if any(quantized):
        mixed = [s for s, q in zip(shard.sources, quantized) if not q]
        raise QuantConfigError(f"{method} layer parts {list(shard.sources)} are fused into one matmul but "
                               f"{', '.join(tensor_name(s, marker) for s in mixed)} is missing while "
                               f"{tensor_name(shard.sources[quantized.index(True)], marker)} exists: "
                               f"fused parts must be all quantized or all float")
    missing = next(s for s, d in zip(shard.sources, dense) if not d)
    raise QuantConfigError(f"tensor {tensor_name(missing, marker)} is missing from the {method} checkpoint "
                           f"(and there is no unquantized {tensor_name(missing, 'weight')} either)")


def check_stored(weights: TensorSource, roles: Iterable[Role], shard: LinearShard, groups: Groups,
                 method: str, config_bits: int) -> None:
    """Every role's full tensor exists, packed ones are int32, and shapes agree with the config.
    A packed dim of the wrong size is reported with the bit widths that would fit it."""
    for role in roles:
        for src in shard.sources:
            name = tensor_name(src, role.suffix)
            if not weights.has(name):
                raise QuantConfigError(f"tensor {name} is missing from the {method} checkpoint")
            if role.packed_dim is not None and weights.get_dtype(name) != torch.int32:
                raise QuantConfigError(f"tensor {name} has dtype {weights.get_dtype(name)}, expected int32 "
                                       f"words of packed {role.bits}-bit codes")
            shape = list(weights.get_shape(name))
            want = expected_shape(role, shard, groups, src)
            if len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want)):
                continue
            hint = ""
            d = role.packed_dim
            if d is not None and len(shape) == len(want):
                n = logical_length(shard, role.axes[d], groups, src)
                fits = [b for b in PACKED_BITS if packed_size(n, b) == shape[d]]
                hint = (f"; its dim {d} fits bits={fits[0]}" if fits else "")
            elif role.dim_of(Axis.G) is not None and len(shape) == len(want):
                hint = f"; dim {role.dim_of(Axis.G)} counts the groups along in_features"
            raise QuantConfigError(
                f"tensor {name} has shape {shape}, expected {want} for bits={config_bits}, "
                f"group_size={groups.size}, in_features={shard.in_features}, "
                f"out_features={logical_length(shard, Axis.N, groups, src)}{hint}: "
                f"the checkpoint disagrees with its quantization_config")


def read_whole(weights: TensorSource, name: str) -> torch.Tensor:
    """A small tensor read whole (g_idx, qzeros, config scalars); Ellipsis also reads 0-d ones."""
    return weights.read(name, (Ellipsis,))
