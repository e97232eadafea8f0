"""HQQ checkpoints (transformers' HQQ integration: each quantized linear saved as HQQLinear's
state dict): the loader.

Stored per quantized layer `{prefix}`: W_q (quant.hqq.packing), scale and zero [G, 1] in the
compute dtype, shape int64 [N, K], nbits / group_size / axis int32 scalars, packing and
compute_dtype as uint8 strings, view_as_float a uint8 flag (and hqq's other bookkeeping scalars).
Layers left float (skip_modules, untagged layers, lm_head) store `weight`.

Each rank reads its rows' codes (quant.hqq.packing), scales and zeros, and cuts its columns. A rank
whose columns start inside a group keeps the covering groups and an explicit group index, so any
group size dividing K loads at any TP size. The rank's layer runs on the GPTQ kernels with the
float zeros split into integer zeros and per-group offsets (quant.common.float_zero); its
`dequantize()` is hqq's own (q - zero) * scale in the compute dtype.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from parallel.sharding import LinearShard, TensorSource, tensor_name
from quant.base import PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.dense import load_dense
from quant.common.float_zero import FloatZeroLinear, split_zero
from quant.hqq.config import METHOD, HqqConfig, LayerParams
from quant.hqq.packing import PACKING_OF_BITS, PACKINGS, PackedCodes, read_code_rows

logger = logging.getLogger(__name__)

QWEIGHT = "W_q"
META = ("scale", "zero", "shape", "nbits", "group_size", "axis")


def read_raw(weights: TensorSource, name: str, index=(Ellipsis,)) -> torch.Tensor:
    """A box in its stored dtype (engine.weights.Weights casts floats unless raw)."""
    try:
        return weights.read(name, index, raw=True)
    except TypeError:  # a TensorSource without the raw flag
        return weights.read(name, index)


def _scalar(weights: TensorSource, name: str) -> int:
    value = read_raw(weights, name).reshape(-1)
    if value.numel() != 1 or value.is_floating_point():
        raise QuantConfigError(f"tensor {name} must hold one integer, got {value.dtype} {list(value.shape)}")
    return int(value[0])


def _string(weights: TensorSource, name: str) -> str | None:
    if not weights.has(name):
        return None
    return bytes(read_raw(weights, name).to(torch.uint8).tolist()).decode("utf-8", "replace")


class _Layer:
    """One stored source's hqq metadata, checked."""

    def __init__(self, weights: TensorSource, src: str, n: int, k: int, params: LayerParams | None):
        for suffix in (QWEIGHT,) + META:
            if not weights.has(tensor_name(src, suffix)):
                raise QuantConfigError(f"tensor {tensor_name(src, suffix)} is missing from the hqq checkpoint "
                                       f"(a quantized layer stores {', '.join((QWEIGHT,) + META)})")
        self.name = tensor_name(src, QWEIGHT)
        self.src = src
        self.nbits = _scalar(weights, tensor_name(src, "nbits"))
        self.axis = _scalar(weights, tensor_name(src, "axis"))
        self.group_size = _scalar(weights, tensor_name(src, "group_size"))
        shape = read_raw(weights, tensor_name(src, "shape")).reshape(-1).tolist()
        if shape != [n, k]:
            raise QuantConfigError(f"tensor {tensor_name(src, 'shape')} is {shape}, but layer {src} is [{n}, {k}] "
                                   f"(out_features, in_features)")
        if params is not None:
            want_gs = k if params.group_size is None else params.group_size
            for field, stored, want in (("nbits", self.nbits, params.nbits), ("axis", self.axis, params.axis),
                                        ("group_size", self.group_size, want_gs)):
                if stored != want:
                    raise QuantConfigError(f"tensor {tensor_name(src, field)} says {field}={stored} but the "
                                           f"quantization_config gives layer {src} {field}={want}")
        if self.nbits not in PACKING_OF_BITS:
            raise QuantConfigError(f"tensor {tensor_name(src, 'nbits')}: nbits={self.nbits} is not supported for layer "
                                   f"{src}; supported: {', '.join(map(str, sorted(PACKING_OF_BITS)))}")
        if self.axis != 1:
            raise QuantConfigError(f"tensor {tensor_name(src, 'axis')}: layer {src} is quantized along axis "
                                   f"{self.axis}; only axis=1 (groups along in_features) is supported")
        if self.group_size < 1 or k % self.group_size:
            raise QuantConfigError(f"tensor {tensor_name(src, 'group_size')}: group_size={self.group_size} does not "
                                   f"divide in_features={k} of layer {src} (axis-1 groups must not span two rows)")
        packing = _string(weights, tensor_name(src, "packing")) or PACKING_OF_BITS[self.nbits]
        if packing not in PACKINGS or PACKING_OF_BITS[self.nbits] != packing:
            raise QuantConfigError(f"tensor {tensor_name(src, 'packing')} is {packing!r}, not the "
                                   f"{PACKING_OF_BITS[self.nbits]!r} packing of nbits={self.nbits} (layer {src})")
        self.groups_per_row = k // self.group_size
        self.codes = PackedCodes(packing, n * self.groups_per_row, self.group_size)
        self.codes.check_exact(self.name)
        stored = weights.get_dtype(self.name)
        word = PACKINGS[packing][2]
        if stored != word and not stored.is_floating_point:
            raise QuantConfigError(f"tensor {self.name} has dtype {stored}; {packing} stores {word} words")
        want = self.codes.stored_shape(stored)
        if list(weights.get_shape(self.name)) != want:
            raise QuantConfigError(f"tensor {self.name} has shape {list(weights.get_shape(self.name))}, expected "
                                   f"{want} for nbits={self.nbits}, group_size={self.group_size}, shape [{n}, {k}]")
        self.stored_dtype = stored
        for suffix in ("scale", "zero"):
            name = tensor_name(src, suffix)
            if list(weights.get_shape(name)) != [self.codes.groups, 1]:
                raise QuantConfigError(f"tensor {name} has shape {list(weights.get_shape(name))}, expected "
                                       f"[{self.codes.groups}, 1] (one per group of layer {src})")
            if not weights.get_dtype(name).is_floating_point:
                raise QuantConfigError(f"tensor {name} has dtype {weights.get_dtype(name)}; expected floats "
                                       f"(quantized scales/zeros are not supported)")

    def read_rows(self, weights: TensorSource, n0: int, n1: int, kb0: int, kb1: int):
        """codes [n1-n0, (kb1-kb0)*gs] and scale / zero [n1-n0, kb1-kb0] of rows n0..n1, groups kb0..kb1."""
        gk = self.groups_per_row
        r0, r1 = n0 * gk, n1 * gk
        codes = read_code_rows(lambda name, index: read_raw(weights, name, index), self.name, self.stored_dtype,
                               self.codes, r0, r1)
        codes = codes.reshape(n1 - n0, gk, self.group_size)[:, kb0:kb1].reshape(n1 - n0, -1)
        meta = [read_raw(weights, tensor_name(self.src, s), (slice(r0, r1), slice(None))).reshape(n1 - n0, gk)[:, kb0:kb1]
                for s in ("scale", "zero")]
        return codes, meta[0], meta[1]


@register(METHOD)
class HqqLoader(WeightsLoader):
    method = METHOD

    def __init__(self, config: HqqConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HqqLoader":
        return cls(HqqConfig.parse(config))

    def describe(self) -> str:
        return self.config.describe()

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        quantized = [weights.has(tensor_name(src, QWEIGHT)) for src in shard.sources]
        for src, q in zip(shard.sources, quantized):
            if q and self.config.skipped(src):
                raise QuantConfigError(f"layer {src} is in skip_modules {list(self.config.skip_modules)} but the "
                                       f"checkpoint stores it quantized ({tensor_name(src, QWEIGHT)})")
            if not q and not weights.has(tensor_name(src, "weight")):
                raise QuantConfigError(f"tensor {tensor_name(src, QWEIGHT)} is missing from the hqq checkpoint (and "
                                       f"there is no float {tensor_name(src, 'weight')} either)")
        if not any(quantized):
            return load_dense(weights, shard)
        if not all(quantized):
            raise QuantConfigError(f"hqq layers {list(shard.sources)} run as one fused matmul but only some are "
                                   f"quantized; fused parts must be all quantized or all float")
        k = shard.in_features
        layers = {}
        for src in shard.sources:
            n = max(b.offset + b.size for b in shard.blocks if b.source == src)
            layers[src] = _Layer(weights, src, n, k, self.config.for_layer(src))
        first = layers[shard.prefix]
        for layer in layers.values():
            if (layer.nbits, layer.group_size) != (first.nbits, first.group_size):
                raise QuantConfigError(f"hqq layers {layer.src} (nbits={layer.nbits}, group_size={layer.group_size}) "
                                       f"and {first.src} (nbits={first.nbits}, group_size={first.group_size}) run "
                                       f"as one fused matmul and must share nbits and group_size")
        gs = first.group_size
        kb0, kb1 = shard.k_start // gs, -(-shard.k_stop // gs)
        parts = [layers[b.source].read_rows(weights, b.offset + b.start, b.offset + b.stop, kb0, kb1)
                 for b in shard.blocks]
        lo = shard.k_start - kb0 * gs
        codes = torch.cat([p[0] for p in parts])[:, lo: lo + shard.local_in_features]
        scale, zero = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        group_ids = torch.arange(shard.k_start, shard.k_stop, device=codes.device) // gs - kb0
        int_zeros, offsets = split_zero(zero, scale, first.nbits)

        def exact(c: torch.Tensor) -> torch.Tensor:  # hqq's dequantize, in the compute dtype
            return ((c.to(scale.dtype) - zero[:, group_ids]) * scale[:, group_ids]).float()

        return FloatZeroLinear(codes, scale.float(), int_zeros, offsets, group_ids, gs, first.nbits, weights.dtype,
                               exact)
