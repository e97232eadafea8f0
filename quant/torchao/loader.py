"""torchao safetensors checkpoints (quant.torchao.config lists the tensors of each kind): the loader.

Every kind is converted at load into a layout the kernels already run:
- Int8Tensor, per row with zero_point 0: Int8Layout; otherwise (zero points, PerGroup): 8-bit
  GPTQLayout with u = q + 128 and zero zp + 128, exact.
- Float8Tensor: FP8Layout (per-row or per-tensor scale).
- Int4Tensor (plain) and the tinygemm tile-packed layout: 4-bit codes with float zeros, run as a
  GPTQLayout plus per-group offsets (quant.common.float_zero).
Each rank reads boxes of the stored tensors covering its rows and columns (tile-packed: whole
8 x 128 tiles), in their stored dtypes, and cuts its exact slice.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.layouts import FP8Layout, GPTQLayout, Int8Layout
from kernels.packing import pack_int32
from parallel.sharding import LinearShard, TensorSource, tensor_name
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.dense import load_dense
from quant.common.float_zero import FloatZeroLinear
from quant.common.scaled_8bit import is_ignored
from quant.torchao import tile_packed
from quant.torchao.config import FLOAT8, INT4_PLAIN, INT4_TILE, INT8, METHOD, TorchaoConfig

QDATA = "_weight_qdata"
TENSORS = {INT8: ("qdata", "scale", "zero_point"), FLOAT8: ("qdata", "scale"), INT4_PLAIN: ("qdata", "scale", "zero_point"),
           INT4_TILE: ("qdata", "scale_and_zero")}
QDATA_DTYPES = {INT8: (torch.int8,), FLOAT8: (torch.float8_e4m3fn,), INT4_PLAIN: (torch.int8, torch.uint8),
                INT4_TILE: (torch.int32,)}


def read_raw(weights: TensorSource, name: str, index=(Ellipsis,)) -> torch.Tensor:
    try:
        return weights.read(name, index, raw=True)
    except TypeError:  # a TensorSource without the raw flag
        return weights.read(name, index)


def _name(src: str, attr: str) -> str:
    return tensor_name(src, f"_weight_{attr}")


def _rows(weights: TensorSource, shard: LinearShard, attr: str, cols: slice = slice(None), n_dim: int = 0,
          extra: tuple = ()) -> torch.Tensor:
    """The rank's output rows of `{src}._weight_{attr}` (rows along `n_dim`), every block in order."""
    parts = []
    for b in shard.blocks:
        rows = slice(b.offset + b.start, b.offset + b.stop)
        parts.append(read_raw(weights, _name(b.source, attr), ((rows, cols) if n_dim == 0 else (cols, rows)) + extra))
    return torch.cat(parts, n_dim)


def _shape(weights: TensorSource, src: str, attr: str) -> list[int]:
    return list(weights.get_shape(_name(src, attr)))


def _check(cond: bool, src: str, attr: str, weights: TensorSource, want: str) -> None:
    if not cond:
        name = _name(src, attr)
        raise QuantConfigError(f"tensor {name} has shape {list(weights.get_shape(name))} and dtype "
                               f"{weights.get_dtype(name)}; expected {want}")


@register(METHOD)
class TorchaoLoader(WeightsLoader):
    method = METHOD

    def __init__(self, config: TorchaoConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TorchaoLoader":
        return cls(TorchaoConfig.parse(config))

    def describe(self) -> str:
        return self.config.describe()

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        kind = self.config.kind
        quantized = [weights.has(tensor_name(src, QDATA)) for src in shard.sources]
        if not any(quantized):
            if all(weights.has(tensor_name(src, "weight")) for src in shard.sources):
                return load_dense(weights, shard)
            missing = next(s for s in shard.sources if not weights.has(tensor_name(s, "weight")))
            raise QuantConfigError(f"tensor {tensor_name(missing, QDATA)} is missing from the torchao checkpoint (and "
                                   f"there is no float {tensor_name(missing, 'weight')} either)")
        if not all(quantized):
            raise QuantConfigError(f"torchao layers {list(shard.sources)} run as one fused matmul but only some are "
                                   f"quantized; fused parts must be all quantized or all float")
        for src in shard.sources:
            if is_ignored(src, self.config.ignored):
                raise QuantConfigError(f"layer {src} is in modules_to_not_convert {list(self.config.ignored)} but the "
                                       f"checkpoint stores it quantized ({tensor_name(src, QDATA)})")
            for attr in TENSORS[kind]:
                if not weights.has(_name(src, attr)):
                    raise QuantConfigError(f"tensor {_name(src, attr)} is missing from the torchao checkpoint "
                                           f"({kind} stores {', '.join('_weight_' + a for a in TENSORS[kind])})")
            dtype = weights.get_dtype(_name(src, "qdata"))
            if dtype not in QDATA_DTYPES[kind]:
                raise QuantConfigError(f"tensor {_name(src, 'qdata')} has dtype {dtype}; the config's {kind} stores "
                                       f"{' or '.join(map(str, QDATA_DTYPES[kind]))}")
        return {INT8: self._int8, FLOAT8: self._float8, INT4_PLAIN: self._int4_plain,
                INT4_TILE: self._int4_tile}[kind](weights, shard)

    # -- 8-bit ------------------------------------------------------------------------------------

    def _groups(self, weights: TensorSource, shard: LinearShard, attr: str, group_dim: int) -> int:
        """Columns per group from the stored scale shape (1 group: K), the same for every source."""
        k = shard.in_features
        sizes = set()
        for src in shard.sources:
            shape = _shape(weights, src, attr)
            n = max(b.offset + b.size for b in shard.blocks if b.source == src)
            g = shape[group_dim] if len(shape) == 2 else 0
            _check(len(shape) == 2 and shape[1 - group_dim] == n and g > 0 and k % g == 0, src, attr, weights,
                   f"{'[N, G]' if group_dim == 1 else '[G, N]'} with N={n} and G dividing in_features={k}")
            sizes.add(k // g)
        if len(sizes) > 1:
            raise QuantConfigError(f"torchao layers {list(shard.sources)} run as one fused matmul but store different "
                                   f"group sizes {sorted(sizes)}")
        gs = sizes.pop()
        if self.config.group_size is not None and gs != self.config.group_size:
            raise QuantConfigError(f"tensor {_name(shard.prefix, attr)} holds groups of {gs} columns but the "
                                   f"quantization_config says group_size={self.config.group_size}")
        return gs

    def _int8(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        for src in shard.sources:
            _check(_shape(weights, src, "zero_point") == _shape(weights, src, "scale"), src, "zero_point", weights,
                   f"the shape of {_name(src, 'scale')}")
        gs = self._groups(weights, shard, "scale", 1)
        k0, k1 = shard.k_start, shard.k_stop
        kb0, kb1 = k0 // gs, -(-k1 // gs)
        q = _rows(weights, shard, "qdata", slice(k0, k1))
        scale = _rows(weights, shard, "scale", slice(kb0, kb1)).float()
        zp = _rows(weights, shard, "zero_point", slice(kb0, kb1))
        if zp.dtype.is_floating_point:
            raise QuantConfigError(f"tensor {_name(shard.prefix, 'zero_point')} has dtype {zp.dtype}; Int8Tensor "
                                   f"stores int8 zero points")
        n, k = q.shape
        if gs == shard.in_features and not bool(zp.any()):
            return KernelLinear(Int8Layout(q.contiguous(), scale[:, 0].contiguous()), weights.dtype)
        g_idx = None if k0 % gs == 0 else (torch.arange(k0, k1) // gs - kb0).to(torch.int32)
        qzeros = None if not bool(zp.any()) else pack_int32((zp.to(torch.int32) + 128).T.contiguous(), 8, 1)
        layout = GPTQLayout(pack_int32((q.to(torch.int32) + 128).T.contiguous(), 8, 0), scale.T.contiguous(), qzeros,
                            g_idx, 8, min(gs, k), k, n)
        return KernelLinear(layout, weights.dtype)

    def _float8(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        q = _rows(weights, shard, "qdata", slice(shard.k_start, shard.k_stop))
        per_tensor = []
        for src in shard.sources:
            shape = _shape(weights, src, "scale")
            n = max(b.offset + b.size for b in shard.blocks if b.source == src)
            _check(shape in ([n, 1], [1, 1], [1], []), src, "scale", weights,
                   f"[{n}, 1] (PerRow) or [1, 1] (PerTensor); block-wise scales are not supported")
            per_tensor.append(shape != [n, 1] or n == 1)
        if len(shard.sources) == 1 and per_tensor[0]:
            scales = read_raw(weights, _name(shard.prefix, "scale")).float().reshape(())
        else:
            parts = []
            for b in shard.blocks:
                s = read_raw(weights, _name(b.source, "scale")).float().reshape(-1)
                parts.append(s.expand(b.local_size) if s.numel() == 1 else s[b.offset + b.start: b.offset + b.stop])
            scales = torch.cat(parts).contiguous()
        return KernelLinear(FP8Layout(q.contiguous(), scales), weights.dtype)

    # -- int4 ---------------------------------------------------------------------------------------

    def _int4_plain(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        k0, k1 = shard.k_start, shard.k_stop
        for src in shard.sources:
            n = max(b.offset + b.size for b in shard.blocks if b.source == src)
            _check(_shape(weights, src, "qdata") == [n, shard.in_features // 2] and shard.in_features % 2 == 0, src,
                   "qdata", weights, f"[{n}, {shard.in_features // 2}] (two 4-bit codes a byte along in_features)")
            _check(_shape(weights, src, "zero_point") == _shape(weights, src, "scale"), src, "zero_point", weights,
                   f"the shape of {_name(src, 'scale')}")
        if k0 % 2 or k1 % 2:
            raise QuantConfigError(f"torchao int4 layer {shard.prefix}: rank {shard.rank} would take input columns "
                                   f"[{k0}, {k1}), which split a byte of two codes; use a TP size giving an even "
                                   f"number of columns per rank")
        gs = self._groups(weights, shard, "scale", 0)
        kb0, kb1 = k0 // gs, -(-k1 // gs)
        packed = _rows(weights, shard, "qdata", slice(k0 // 2, k1 // 2)).view(torch.int8)
        low = (packed << 4) >> 4  # sign-extended: column 2j
        high = packed >> 4  # column 2j + 1
        q = torch.stack([low, high], -1).reshape(packed.shape[0], -1).to(torch.int32)  # signed, [-8, 7]
        scale = _rows(weights, shard, "scale", slice(kb0, kb1), n_dim=1).T  # [N, G], stored dtype
        zero = _rows(weights, shard, "zero_point", slice(kb0, kb1), n_dim=1).T
        group_ids = torch.arange(k0, k1) // gs - kb0

        def exact(u: torch.Tensor) -> torch.Tensor:  # w = q * scale + zero_point
            return (u - 8).float() * scale.float()[:, group_ids] + zero.float()[:, group_ids]

        return _float_zero(q + 8, scale, zero, group_ids, gs, weights.dtype, exact)

    def _int4_tile(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        k0, k1 = shard.k_start, shard.k_stop
        gs = self.config.group_size
        words = None
        for src in shard.sources:
            n = max(b.offset + b.size for b in shard.blocks if b.source == src)
            shape = _shape(weights, src, "qdata")
            ok = len(shape) == 4 and shape[2] == tile_packed.LANES and shape[3] in (1, 2, 4)
            tk = tile_packed.tile_k(shape[3]) if ok else 0
            _check(ok and shape[0] * tile_packed.TILE_N >= n and shape[1] * tk >= shard.in_features, src, "qdata",
                   weights, f"[N'/8, K'/{tk or 128}, 32, W] covering [{n}, {shard.in_features}]")
            _check(_shape(weights, src, "scale_and_zero") == [shape[1] * tk // gs, shape[0] * tile_packed.TILE_N, 2],
                   src, "scale_and_zero", weights,
                   f"[{shape[1] * tk // gs}, {shape[0] * tile_packed.TILE_N}, 2] for group_size={gs}")
            if shard.in_features % gs:
                raise QuantConfigError(f"torchao group_size={gs} does not divide in_features={shard.in_features} of "
                                       f"layer {src}")
            words = shape[3] if words is None else words
        tk = tile_packed.tile_k(words)
        kt0, kt1 = k0 // tk, -(-k1 // tk)
        codes = []
        for b in shard.blocks:
            n0, n1 = b.offset + b.start, b.offset + b.stop
            nt0, nt1 = n0 // tile_packed.TILE_N, -(-n1 // tile_packed.TILE_N)
            box = read_raw(weights, _name(b.source, "qdata"), (slice(nt0, nt1), slice(kt0, kt1)))
            c = tile_packed.decode(box)
            r = n0 - nt0 * tile_packed.TILE_N
            codes.append(c[r: r + n1 - n0, k0 - kt0 * tk: k1 - kt0 * tk])
        kb0, kb1 = k0 // gs, -(-k1 // gs)
        sz = _rows(weights, shard, "scale_and_zero", slice(kb0, kb1), n_dim=1, extra=(slice(None),))
        scale, zero = sz[..., 0].T, sz[..., 1].T  # [N, G], stored dtype
        group_ids = torch.arange(k0, k1) // gs - kb0

        def exact(u: torch.Tensor) -> torch.Tensor:  # torchao's tinygemm dequantization, in the stored dtype
            return ((u - 8).to(scale.dtype) * scale[:, group_ids] + zero[:, group_ids]).float()

        return _float_zero(torch.cat(codes), scale, zero, group_ids, gs, weights.dtype, exact)


def _float_zero(codes, scale, zero, group_ids, gs, act_dtype, exact) -> PackedLinear:
    """w = (u - 8) * s + zero as (u - zi) * s + c: zi the nearest integer to 8 - zero / s."""
    s, z = scale.float(), zero.float()
    zi = torch.where(s != 0, 8 - z / torch.where(s != 0, s, 1), 8).round().clamp(0, 15)
    offsets = (zi - 8) * s + z
    return FloatZeroLinear(codes, s, zi.to(torch.int32), offsets, group_ids, gs, 4, act_dtype, exact)
