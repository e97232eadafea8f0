"""int8 weight-only, EETQ style (`quant_method: "eetq"`): float checkpoints quantized at load.

EETQ's served checkpoints (TGI `--quantize eetq`, transformers' EetqConfig with weights "int8")
hold ordinary float weights; the int8 codes are made when loading, symmetric per output channel:
s[n] = amax_k |w[n, k]| / 127, q = round(w / s) in [-127, 127], w ~= q * s. Layers in
`modules_to_not_convert` (and lm_head, which the checkpoint keeps in float) stay float.

Each rank reads only its float shard and quantizes that. On column layouts a rank holds whole
rows, so its codes and scales are exactly the TP=1 ones; on row layouts a rank holds part of
each row and its scales come from that part (TGI does the same): finer than TP=1's, so the
per-rank weights are "the quantization of the rank's slice", not a slice of the TP=1 quantization.

Checkpoints that transformers wrote after quantizing with the eetq package store int8 `weight`
in the eetq CUDA kernel's preprocessed (interleaved) order with `weight_scales`: refused, with
the reason. The on-disk int8 weight-only convention qshard reads is compressed-tensors
int-quantized W8A16 (quant.compressed_tensors_8bit).
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.layouts import Int8Layout
from parallel.sharding import LinearShard, TensorSource, read_shard, tensor_name
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.scaled_8bit import WEIGHT, is_ignored
from quant.common.dense import load_dense

METHOD = "eetq"
INT8_MAX = 127


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (codes int8 [N, K], scales float32 [N]) with w ~= codes * scales."""
    w = w.float()
    scales = (w.abs().amax(1) / INT8_MAX).clamp(min=1e-12)  # an all-zero row gets codes 0
    codes = (w / scales[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scales


@register(METHOD)
class EetqLoader(WeightsLoader):
    method = METHOD

    def __init__(self, ignored: list[str]):
        self.ignored = ignored

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "EetqLoader":
        kind = config.get("weights", "int8")
        if kind != "int8":
            raise QuantConfigError(f"eetq quantization_config field weights={kind!r} is not supported; supported: "
                                   f"int8")
        ignored = config.get("modules_to_not_convert") or []
        if not isinstance(ignored, list) or not all(isinstance(m, str) for m in ignored):
            raise QuantConfigError(f"eetq quantization_config field modules_to_not_convert={ignored!r} must be a "
                                   f"list of module names")
        return cls(ignored)

    def describe(self) -> str:
        return "eetq (int8 weight-only, per-channel, quantized at load)"

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        if all(is_ignored(src, self.ignored) or src.endswith("lm_head") for src in shard.sources):
            return load_dense(weights, shard)
        for src in shard.sources:
            name = tensor_name(src, WEIGHT.suffix)
            if weights.has(tensor_name(src, "weight_scales")) or (weights.has(name) and
                                                                  not weights.get_dtype(name).is_floating_point):
                raise QuantConfigError(f"tensor {name} is stored quantized ({weights.get_dtype(name)}, with "
                                       f"{tensor_name(src, 'weight_scales')}): eetq-package int8 weights are in "
                                       f"its CUDA kernel's preprocessed order, which qshard does not read; load "
                                       f"the float checkpoint with quant_method 'eetq' instead")
        w = read_shard(weights, WEIGHT, shard)
        if w.dtype == torch.float8_e4m3fn or not w.is_floating_point():
            raise QuantConfigError(f"tensor {tensor_name(shard.prefix, 'weight')} has dtype {w.dtype}; eetq "
                                   f"quantizes 16/32-bit float weights")
        codes, scales = quantize_int8_per_channel(w)
        return KernelLinear(Int8Layout(codes, scales), weights.dtype)
