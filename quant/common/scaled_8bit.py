"""Pieces shared by the 8-bit formats (fp8 / fbgemm_fp8, eetq, compressed-tensors float- and
int-quantized): reading a layer's 8-bit `weight` and its per-tensor or per-channel scale through
the sharding rules, and telling quantized layers from float ones.

Stored per layer `{prefix}`: `weight` [N, K] (float8_e4m3fn or int8) and one scale, the multiplier
that dequantizes it (w = q * scale), shaped [] or [1] (per tensor) or [N] or [N, 1] (per channel).
Roles: per-channel scales run along N, so the rules table cuts them with the output blocks on
column layouts and keeps them whole on row layouts; per-tensor scales are FULL (always whole).
A fused layer (qkv, gate_up) whose parts have different per-tensor scales gets them spread over
each part's rows, i.e. per-channel scales: exact, no requantization.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from parallel.sharding import Axis, LinearShard, Role, TensorSource, logical_length, read_shard, tensor_name
from quant.base import PackedLinear, QuantConfigError
from quant.common.dense import load_dense

WEIGHT = Role("weight", (Axis.N, Axis.K))
SCALE_ROLES = {  # stored rank -> role; which fits is decided by the stored shape (`_scale_role`)
    "tensor0": lambda s: Role(s, ()),
    "tensor1": lambda s: Role(s, (Axis.FULL,)),
    "channel1": lambda s: Role(s, (Axis.N,)),
    "channel2": lambda s: Role(s, (Axis.N, Axis.FULL)),
}
FLOAT8 = torch.float8_e4m3fn


def only(shard: LinearShard, source: str) -> LinearShard:
    """The part of a (fused) shard stored under one source prefix."""
    return replace(shard, blocks=tuple(b for b in shard.blocks if b.source == source))


def scale_name(weights: TensorSource, src: str, names: Sequence[str], method: str) -> str:
    """The one scale tensor of `src` among `names` (weight_scale, or DeepSeek's weight_scale_inv)."""
    found = [tensor_name(src, n) for n in names if weights.has(tensor_name(src, n))]
    if not found:
        raise QuantConfigError(f"tensor {tensor_name(src, names[0])} is missing from the {method} checkpoint "
                               f"(a quantized weight needs {' or '.join(names)})")
    if len(found) > 1:
        raise QuantConfigError(f"{method} layer {src} stores both {' and '.join(found)}; expected one scale")
    return found[0]


def _scale_role(weights: TensorSource, name: str, suffix: str, n: int, per_tensor_ok: bool,
                per_channel_ok: bool, method: str) -> tuple[Role, bool]:
    """(role, per_tensor) from the stored shape; a shape fitting neither is named."""
    shape = list(weights.get_shape(name))
    allowed = []
    if per_tensor_ok:
        allowed += [[], [1]]
        if shape in ([], [1]) and not (shape == [1] and n == 1 and per_channel_ok):
            return SCALE_ROLES[f"tensor{len(shape)}"](suffix), True
    if per_channel_ok:
        allowed += [[n], [n, 1]]
        if shape in ([n], [n, 1]):
            return SCALE_ROLES[f"channel{len(shape)}"](suffix), False
    hint = ""
    if len(shape) == 2 and shape[0] < n:
        hint = " (a block-wise scale? block-wise FP8, weight_block_size, is not supported)"
    raise QuantConfigError(f"tensor {name} has shape {shape}; {method} expects one of {allowed} for "
                           f"out_features={n}{hint}")


def read_scales(weights: TensorSource, shard: LinearShard, names: Sequence[str], method: str,
                per_tensor_ok: bool = True, per_channel_ok: bool = True) -> torch.Tensor:
    """The rank's scales as float32: 0-d for a single per-tensor source, else [N_local]."""
    parts, per_tensor = [], []
    for src in shard.sources:
        sub = only(shard, src)
        name = scale_name(weights, src, names, method)
        suffix = name[len(src) + 1:] if src else name
        n = logical_length(sub, Axis.N, None, src)
        role, tensor_wise = _scale_role(weights, name, suffix, n, per_tensor_ok, per_channel_ok, method)
        s = read_shard(weights, role, sub).float()
        if not torch.isfinite(s).all():
            raise QuantConfigError(f"tensor {name} holds non-finite scales")
        parts.append(s.reshape(()) if tensor_wise else s.reshape(-1))
        per_tensor.append(tensor_wise)
    if len(parts) == 1 and per_tensor[0]:
        return parts[0]
    rows = [only(shard, src).local_out_features for src in shard.sources]
    return torch.cat([p.expand(r) if t else p for p, t, r in zip(parts, per_tensor, rows)]).contiguous()


def read_weight(weights: TensorSource, shard: LinearShard, dtype: torch.dtype, method: str) -> torch.Tensor:
    """The rank's [N_local, K_local] 8-bit weight; its stored dtype must be `dtype`."""
    for src in shard.sources:
        name = tensor_name(src, WEIGHT.suffix)
        if weights.has(name) and weights.get_dtype(name) != dtype:
            raise QuantConfigError(f"tensor {name} has dtype {weights.get_dtype(name)}; {method} stores quantized "
                                   f"weights as {dtype}")
    return read_shard(weights, WEIGHT, shard)


def is_ignored(module: str, ignored: Sequence[str]) -> bool:
    """vLLM/HF style: an entry names the module exactly or is a dotted suffix of it ("lm_head")."""
    return any(module == e or module.endswith("." + e) for e in ignored)


def dense_or_none(weights: TensorSource, shard: LinearShard, ignored: Sequence[str], scale_names: Sequence[str],
                  quantized_dtype: torch.dtype, method: str) -> PackedLinear | None:
    """A float layer when the config ignores it or it is stored in float without any scale (lm_head);
    None when it is quantized. A float weight beside a scale is an error (a wrong dtype)."""
    skipped = [is_ignored(src, ignored) for src in shard.sources]
    if all(skipped):
        for src in shard.sources:
            name = tensor_name(src, WEIGHT.suffix)
            if weights.has(name) and weights.get_dtype(name).itemsize == 1:
                raise QuantConfigError(f"tensor {name} is {weights.get_dtype(name)} but {src} is an ignored "
                                       f"(float) layer of the {method} config")
        return load_dense(weights, shard)
    if any(skipped):
        raise QuantConfigError(f"{method} layers {list(shard.sources)} run as one fused matmul but only some are "
                               f"in the ignored layers {list(ignored)}")
    kinds = []
    for src in shard.sources:
        name = tensor_name(src, WEIGHT.suffix)
        if not weights.has(name):
            raise QuantConfigError(f"tensor {name} is missing from the {method} checkpoint")
        dtype = weights.get_dtype(name)
        has_scale = any(weights.has(tensor_name(src, n)) for n in scale_names)
        if dtype == quantized_dtype:
            kinds.append(True)
        elif dtype.is_floating_point and dtype.itemsize > 1 and not has_scale:
            kinds.append(False)
        else:
            raise QuantConfigError(f"tensor {name} has dtype {dtype}; {method} stores quantized weights as "
                                   f"{quantized_dtype} (with {' or '.join(scale_names)}) and float layers as "
                                   f"16/32-bit floats without a scale")
    if all(kinds):
        return None
    if not any(kinds):
        return load_dense(weights, shard)
    raise QuantConfigError(f"{method} layers {list(shard.sources)} run as one fused matmul but mix quantized and "
                           f"float weights")
