"""compressed-tensors' "pack-quantized" format (int weights, W4A16 / W8A16): the reader (the
writer: quant.compressed_tensors.packer).

pack-quantized tensors of a layer `{prefix}` (checked against compressed-tensors 0.20's own
pack_to_int32 / PackedQuantizationCompressor, and the older pack_factor packer before it):
- weight_packed      int32 [N, ceil(K*b/32)]: codes packed along K as a little-endian bit stream
                     (code k of a row at bits [k*b, (k+1)*b) of the row's words); each stored code
                     is the signed code + 2^(b-1), i.e. our unsigned code.
- weight_scale       float [N, G] (channel: [N, 1]; tensor: [1]), in the model's dtype.
- weight_zero_point  asymmetric only. group/channel: int32 [ceil(N*b/32), G], packed along N
                     the same way, holding signed zero + 2^(b-1), i.e. the TRUE unsigned zero
                     point. tensor: int8 [1], signed (not packed). Symmetric: absent (zero = 0
                     signed = 2^(b-1) unsigned).
- weight_g_idx       int32 [K], legacy actorder "group" only (all -1: not yet set, column order).
- weight_shape       int64 [2] = [N, K].
w = (code - zero) * scale, the same as GPTQ v2. For b in {2, 4, 8} the bit stream is word for word
GPTQ's, so GPTQLayout.qweight is weight_packed transposed ([N, K/8] -> [K/8, N]) and qzeros is
weight_zero_point transposed; no code is rewritten. Other widths are refused: 3, 5, 6 and 7 bits
were packed 32//b codes per word (bits wasted) before compressed-tensors' dense packer, with the
same config, so a checkpoint alone cannot say which layout it holds.
"""

import logging
from dataclasses import replace

import torch

from kernels.layouts import GPTQLayout
from kernels.packing import pack_int32, unpack_int32
from parallel.sharding import (Axis, Groups, LinearShard, Role, TensorSource, local_group_ids,
                               logical_length, read_shard, tensor_name)
from quant.base import KernelLinear, PackedLinear, QuantConfigError
from quant.compressed_tensors.scheme import FormatHandler, Scheme, register_format

logger = logging.getLogger(__name__)

PACK_QUANTIZED = "pack-quantized"
PACKED_BITS = (2, 4, 8)
PACKED_STRATEGIES = ("group", "channel", "tensor")
# The compressed-tensors release whose output the packer reproduces (written as "version").
FORMAT_VERSION = "0.20.0"

PACKED = Role("weight_packed", (Axis.N, Axis.K), packed_dim=1)
SCALE = Role("weight_scale", (Axis.N, Axis.G))
ZERO = Role("weight_zero_point", (Axis.N, Axis.G), packed_dim=0)
G_IDX = Role("weight_g_idx", (Axis.K,), group_ids=True)
G_IDX_WHOLE = Role("weight_g_idx", (Axis.FULL,))
SHAPE = Role("weight_shape", (Axis.FULL,))
TENSOR_SCALE = Role("weight_scale", (Axis.FULL,))
TENSOR_ZERO = Role("weight_zero_point", (Axis.FULL,))


@register_format(PACK_QUANTIZED)
class PackQuantized(FormatHandler):
    format = PACK_QUANTIZED

    @classmethod
    def check_scheme(cls, scheme: Scheme) -> None:
        where = f"config_groups.{scheme.name}"
        w = scheme.weights
        if w is None:
            raise QuantConfigError(f"{where} has no weights args; pack-quantized stores quantized weights")
        if scheme.input_activations is not None or scheme.output_activations is not None:
            raise QuantConfigError(f"{where} quantizes activations; only weight-only schemes (W4A16, W8A16) "
                                   f"are supported")
        if w.type != "int":
            raise QuantConfigError(f"{where}.weights.type={w.type!r}; pack-quantized holds int weights")
        if w.num_bits not in PACKED_BITS:
            why = (f" (compressed-tensors 0.20 packs {w.num_bits}-bit codes densely across words, earlier versions "
                   f"{32 // w.num_bits} whole codes per word, and the checkpoint does not say which)"
                   if 32 % w.num_bits and w.num_bits <= 8 else "")
            raise QuantConfigError(f"{where}.weights.num_bits={w.num_bits} is not supported for pack-quantized; "
                                   f"supported: {', '.join(map(str, PACKED_BITS))}{why}")
        if w.strategy not in PACKED_STRATEGIES:
            raise QuantConfigError(f"{where}.weights.strategy={w.strategy!r} is not supported; supported: "
                                   f"{', '.join(PACKED_STRATEGIES)}")
        if w.dynamic:
            raise QuantConfigError(f"{where}.weights.dynamic={w.dynamic!r}; stored weights must be static")

    def load_linear(self, weights: TensorSource, shard: LinearShard, scheme: Scheme) -> PackedLinear:
        w = scheme.weights
        bits = w.num_bits
        _check_weight_shapes(weights, shard)
        act_order = w.has_g_idx and _has_group_order(weights, shard)
        groups = Groups(w.group_size if w.strategy == "group" else -1, act_order)
        packed = _int32(read_shard(weights, PACKED.with_bits(bits), shard, groups), shard, PACKED)
        if w.strategy == "tensor":
            scales, qzeros = _per_tensor_params(weights, shard, bits, w.symmetric)
        else:
            scales = read_shard(weights, SCALE, shard, groups).T.contiguous()
            qzeros = None
            if not w.symmetric:
                qzeros = _int32(read_shard(weights, ZERO.with_bits(bits), shard, groups), shard, ZERO).T.contiguous()
        if qzeros is not None and _all_symmetric(qzeros, bits, shard.local_out_features):
            qzeros = None  # the symmetric zero everywhere: the kernels' symmetric path is exact
        group_size = groups.size_for(shard.in_features)
        g_idx = None
        if act_order:
            g_idx = read_shard(weights, G_IDX, shard, groups)  # absolute ids into the whole group table
        elif shard.k_start % group_size and groups.count(shard.in_features) > 1:
            g_idx = local_group_ids(shard, groups)  # K range starts inside a group
        try:
            layout = GPTQLayout(qweight=packed.T.contiguous(), scales=scales, qzeros=qzeros, g_idx=g_idx, bits=bits,
                                group_size=group_size, in_features=shard.local_in_features,
                                out_features=shard.local_out_features)
        except ValueError as e:
            raise QuantConfigError(f"{shard.prefix}: pack-quantized tensors do not form a layer: {e}") from None
        return KernelLinear(layout, weights.dtype)


def _only(shard: LinearShard, source: str) -> LinearShard:
    """The part of a (fused) shard stored under one source prefix."""
    return replace(shard, blocks=tuple(b for b in shard.blocks if b.source == source))


def _check_weight_shapes(weights: TensorSource, shard: LinearShard) -> None:
    """weight_shape is the only record of the exact K (packing pads it): it must match the model."""
    for src in shard.sources:
        sub = _only(shard, src)
        stored = read_shard(weights, SHAPE, sub)
        want = [logical_length(sub, Axis.N, None, src), shard.in_features]
        if stored.dtype.is_floating_point or stored.tolist() != want:
            raise QuantConfigError(f"tensor {tensor_name(src, SHAPE.suffix)} = {stored.tolist()} disagrees with "
                                   f"the model config, which gives [out_features, in_features] = {want}")


def _has_group_order(weights: TensorSource, shard: LinearShard) -> bool:
    """actorder "group": is weight_g_idx set? compressed-tensors initialised it to -1 (column order)."""
    g_idx = read_shard(weights, G_IDX_WHOLE, shard)  # whole [K]; fused layers must share it
    name = tensor_name(shard.prefix, G_IDX.suffix)
    if bool((g_idx < 0).all()):
        return False
    if bool((g_idx < 0).any()):
        raise QuantConfigError(f"tensor {name} mixes unset (-1) and set group ids")
    return True


def _per_tensor_params(weights: TensorSource, shard: LinearShard, bits: int, symmetric: bool):
    """Strategy "tensor": one scale (and signed int8 zero) per stored tensor, spread over its rows."""
    scales, zeros = [], []
    for src in shard.sources:
        sub = _only(shard, src)
        rows = sub.local_out_features
        scale = read_shard(weights, TENSOR_SCALE, sub)
        _one_value(scale, src, TENSOR_SCALE)
        scales.append(scale.reshape(1).expand(rows))
        if not symmetric:
            zero = read_shard(weights, TENSOR_ZERO, sub)
            _one_value(zero, src, TENSOR_ZERO)
            if zero.dtype.is_floating_point:
                raise QuantConfigError(f"tensor {tensor_name(src, TENSOR_ZERO.suffix)} must hold an integer zero "
                                       f"point, got {zero.dtype}")
            zeros.append(zero.reshape(1).to(torch.int32).expand(rows) + (1 << (bits - 1)))
    qzeros = pack_int32(torch.cat(zeros)[None], bits, dim=1) if zeros else None
    return torch.cat(scales)[None].contiguous(), qzeros


def _one_value(t: torch.Tensor, src: str, role: Role) -> None:
    if t.numel() != 1:
        raise QuantConfigError(f"tensor {tensor_name(src, role.suffix)} has shape {list(t.shape)}; strategy "
                               f"'tensor' stores one value")


def _int32(t: torch.Tensor, shard: LinearShard, role: Role) -> torch.Tensor:
    if t.dtype != torch.int32:
        raise QuantConfigError(f"tensor {tensor_name(shard.prefix, role.suffix)} must be int32 packed codes, "
                               f"got {t.dtype}")
    return t


def _all_symmetric(qzeros: torch.Tensor, bits: int, n: int) -> bool:
    return bool((unpack_int32(qzeros, bits, 1, count=n) == (1 << (bits - 1))).all())
