"""The bitsandbytes WeightsLoader: 4-bit nf4/fp4 as a LUT4Layout (Triton kernel on CUDA, dequantized
fallback on CPU), LLM.int8 as the Int8Layout every backend runs fused.

LLM.int8 per layer `{p}`: `{p}.weight` int8 [N, K], `{p}.SCB` float32 [N] (each row's absmax),
`{p}.weight_format` uint8 0 ("row"); w = weight * SCB / 127, so the Int8Layout scale is SCB / 127.
bitsandbytes' outlier threshold (llm_int8_threshold) only decides which activation columns its
kernel multiplies in 16-bit; qshard keeps activations unquantized, which is that product exactly.
Layers left in float (llm_int8_skip_modules, lm_head) load as dense weights.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.layouts import Int8Layout
from parallel.sharding import Axis, LinearShard, Role, TensorSource, read_shard, tensor_name
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.bitsandbytes.config import METHOD, BnbConfig
from quant.bitsandbytes.four_bit import load_4bit, quant_state_name
from quant.common.dense import DenseLinear, load_dense

WEIGHT = Role("weight", (Axis.N, Axis.K))
INT8_MAX = 127.0


def is_skipped(module: str, skip: tuple[str, ...]) -> bool:
    """transformers' rule: an entry names the module or any dotted part of its name ("lm_head")."""
    return any(module == s or module.endswith("." + s) or f".{s}." in f".{module}." for s in skip)


@register(METHOD)
class BnbLoader(WeightsLoader):
    method = METHOD

    def __init__(self, config: BnbConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BnbLoader":
        return cls(BnbConfig.parse(config))

    def describe(self) -> str:
        return self.config.describe()

    def _is_quantized(self, weights: TensorSource, src: str) -> bool:
        if is_skipped(src, self.config.skip_modules):
            return False
        name = tensor_name(src, "weight")
        if self.config.bits == 4:
            if quant_state_name(weights, src) is not None:
                return True
            has_parts = weights.has(tensor_name(src, "weight.absmax")) or weights.has(tensor_name(src, "weight.quant_map"))
            stored_4bit = weights.has(name) and weights.get_shape(name)[-1:] == [1] and len(weights.get_shape(name)) == 2
            if has_parts or stored_4bit:
                return True  # read_quant_state names the missing tensor
            return False
        if weights.has(tensor_name(src, "SCB")):
            return True
        if weights.has(name) and weights.get_dtype(name) == torch.int8:
            raise QuantConfigError(f"tensor {tensor_name(src, 'SCB')} is missing from the bitsandbytes 8-bit "
                                   f"checkpoint ({name} is int8 and needs its row scales)")
        return False

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        kinds = [self._is_quantized(weights, src) for src in shard.sources]
        if not any(kinds):
            return load_dense(weights, shard)
        if not all(kinds):
            raise QuantConfigError(f"bitsandbytes layers {list(shard.sources)} run as one fused matmul but mix "
                                   f"quantized and float weights")
        if self.config.bits == 4:
            layout = load_4bit(weights, shard, self.config.quant_type)
            if isinstance(layout, torch.Tensor):  # blocks across rows: no LUT4Layout holds the rank's part
                return DenseLinear(layout.to(weights.dtype))
            return KernelLinear(layout, weights.dtype)
        return KernelLinear(self._int8_layout(weights, shard), weights.dtype)

    def _int8_layout(self, weights: TensorSource, shard: LinearShard) -> Int8Layout:
        for src in shard.sources:
            name = tensor_name(src, "weight")
            if weights.get_dtype(name) != torch.int8:
                raise QuantConfigError(f"tensor {name} has dtype {weights.get_dtype(name)}; bitsandbytes 8-bit "
                                       f"stores quantized weights as int8")
            fmt_name = tensor_name(src, "weight_format")
            if weights.has(fmt_name):
                fmt = weights.read(fmt_name, None)
                if fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != 0:
                    raise QuantConfigError(f"tensor {fmt_name} = {fmt.tolist()}: only weight_format 0 (\"row\") is "
                                           f"supported; tiled GPU formats (col32, col_turing, col_ampere) are not")
            n_src = max(b.offset + b.size for b in shard.blocks if b.source == src)
            if list(weights.get_shape(tensor_name(src, "SCB"))) != [n_src]:
                raise QuantConfigError(f"tensor {tensor_name(src, 'SCB')} has shape "
                                       f"{weights.get_shape(tensor_name(src, 'SCB'))}, expected [{n_src}]")
            if weights.get_dtype(tensor_name(src, "SCB")) != torch.float32:
                raise QuantConfigError(f"tensor {tensor_name(src, 'SCB')} has dtype "
                                       f"{weights.get_dtype(tensor_name(src, 'SCB'))}; expected float32")
        codes = read_shard(weights, WEIGHT, shard)
        scb = torch.cat([_float32(weights, tensor_name(b.source, "SCB"))[b.offset + b.start: b.offset + b.stop]
                         for b in shard.blocks])
        if not torch.isfinite(scb).all():
            raise QuantConfigError(f"tensor {tensor_name(shard.prefix, 'SCB')} holds non-finite row scales")
        return Int8Layout(codes, scb / INT8_MAX)


def _float32(weights: TensorSource, name: str) -> torch.Tensor:
    """A whole float32 tensor as stored (a read would cast it to the engine's dtype)."""
    return weights.read(name, None) if weights.dtype == torch.float32 else weights.read(name, None, raw=True)
