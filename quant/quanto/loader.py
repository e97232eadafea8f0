"""The optimum-quanto WeightsLoader. What maps onto a kernel layout runs fused: qint8 as Int8Layout,
qfloat8 (e4m3fn) as FP8Layout, qint4 / qint2 with integer zero points as GPTQLayout (codes, scales and
zero points per group, groups along K exactly as the kernels read them). qint4 / qint2 with quanto's
default float shift (w = scale * q - shift) and the other float8 variants have no exact layout: the
rank's part is dequantized at load, as quanto computes it, and runs as a dense weight.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.layouts import FP8Layout, GPTQLayout, Int8Layout
from kernels.packing import pack_int32
from parallel.sharding import LinearShard, TensorSource, tensor_name
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.dense import DenseLinear, load_dense
from quant.quanto.config import METHOD, WEIGHT_TYPES, QuantoConfig
from quant.quanto.tensors import need, read_stored, row_blocks, sub_bytes_part

FLOAT8 = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz, "e5m2": torch.float8_e5m2}


@register(METHOD)
class QuantoLoader(WeightsLoader):
    method = METHOD

    def __init__(self, config: QuantoConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantoLoader":
        return cls(QuantoConfig.parse(config))

    def describe(self) -> str:
        types = sorted(set(self.config.qmap.values())) if self.config.qmap is not None else [self.config.default]
        return f"quanto ({', '.join(t for t in types if t)}, float activations)"

    def _qtype(self, weights: TensorSource, src: str) -> str | None:
        qtype = self.config.weight_type(src)
        stored = weights.has(tensor_name(src, "weight._data")) or weights.has(tensor_name(src, "weight._data._data"))
        if qtype is None and stored:
            raise QuantConfigError(f"layer {src} is stored quantized (weight._data) but {self.config.source} has no "
                                   f"\"weights\" entry for it")
        return qtype

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        qtypes = {src: self._qtype(weights, src) for src in shard.sources}
        kinds = set(qtypes.values())
        if kinds == {None}:
            return load_dense(weights, shard)
        if len(kinds) > 1:
            raise QuantConfigError(f"quanto layers {list(shard.sources)} run as one fused matmul but have weight "
                                   f"types {qtypes}")
        qtype = kinds.pop()
        bits, kind = WEIGHT_TYPES[qtype]
        if bits < 8:
            return self._sub_byte(weights, shard, bits, qtype)
        data = torch.cat([self._rows(weights, need(weights, tensor_name(src, "weight._data"), qtype), shard, src, True)
                          for src in shard.sources])
        scale = torch.cat([self._rows(weights, need(weights, tensor_name(src, "weight._scale"), qtype), shard, src, False)
                           for src in shard.sources]).float().reshape(-1)
        want = torch.int8 if kind == "int" else FLOAT8[kind]
        if data.dtype != want:
            raise QuantConfigError(f"tensor {tensor_name(shard.prefix, 'weight._data')} has dtype {data.dtype}; "
                                   f"{qtype} stores {want}")
        if kind == "int":
            return KernelLinear(Int8Layout(data, scale), weights.dtype)
        if kind == "e4m3fn":
            return KernelLinear(FP8Layout(data, scale), weights.dtype)
        return DenseLinear((data.to(torch.float32) * scale[:, None]).to(weights.dtype))

    @staticmethod
    def _rows(weights: TensorSource, name: str, shard: LinearShard, src: str, columns: bool) -> torch.Tensor:
        """The rank's rows of [N, K] (columns: its K range too) or [N, 1] tensor `name`, as stored."""
        n_src = max(b.offset + b.size for b in shard.blocks if b.source == src)
        shape = list(weights.get_shape(name))
        want = [n_src, shard.in_features if columns else 1]
        if shape != want:
            raise QuantConfigError(f"tensor {name} has shape {shape}, expected {want}")
        k = slice(shard.k_start, shard.k_stop) if columns else slice(None)
        return torch.cat([read_stored(weights, name, (slice(r0, r1), k)) for r0, r1 in row_blocks(shard, src)])

    def _sub_byte(self, weights: TensorSource, shard: LinearShard, bits: int, qtype: str) -> PackedLinear:
        parts = [sub_bytes_part(weights, src, shard, bits, qtype) for src in shard.sources]
        sizes = {p[4] for p in parts}
        if len(sizes) > 1:
            raise QuantConfigError(f"quanto layers {list(shard.sources)} run as one fused matmul but have group "
                                   f"sizes {sorted(sizes)}")
        codes, scale, shift = (torch.cat([p[i] for p in parts]) for i in range(3))
        j0, gs = parts[0][3], parts[0][4]
        group_of = torch.arange(shard.k_start, shard.k_stop) // gs - j0  # column -> the rank's group column
        if shift.dtype.is_floating_point:  # quanto: dqt = scale * q; dqt -= shift (in the scale's dtype)
            w = scale[:, group_of] * codes.to(scale.dtype) - shift[:, group_of].to(scale.dtype)
            return DenseLinear(w.to(weights.dtype))
        if shift.dtype != torch.uint8 or int(shift.max()) >= 1 << bits:
            raise QuantConfigError(f"tensor {tensor_name(shard.prefix, 'weight._shift')} holds {shift.dtype} zero "
                                   f"points up to {int(shift.max())}; {qtype} zero points are uint8 below {1 << bits}")
        aligned = shard.k_start % gs == 0
        layout = GPTQLayout(
            qweight=pack_int32(codes.T.to(torch.int32), bits, 0),
            scales=scale.T.float().contiguous(),
            qzeros=pack_int32(shift.T.to(torch.int32), bits, 1),
            g_idx=None if aligned else group_of.to(torch.int32),
            bits=bits, group_size=gs, in_features=shard.local_in_features, out_features=codes.shape[0])
        return KernelLinear(layout, weights.dtype)
