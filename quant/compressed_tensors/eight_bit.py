"""compressed-tensors "float-quantized" (FP8) and "int-quantized" (int8) formats: 8-bit weights
stored one code per element (checked against compressed-tensors 0.20's NaiveQuantizationCompressor,
which the package registers under both names).

Tensors of a layer `{prefix}`:
- weight        [N, K], float8_e4m3fn (float-quantized) or int8 (int-quantized), the codes.
- weight_scale  channel: [N, 1]; tensor: [1]; in the model's dtype (often float32 for FP8).
                w = weight * weight_scale. Symmetric only here (no weight_zero_point).
- input_scale   only with static input activations.
Schemes accepted: weights 8-bit symmetric, strategy channel or tensor, static; input activations
none (W8A16), or 8-bit symmetric of the weights' type, either dynamic per token (W8A8, the
"FP8_DYNAMIC" / "W8A8" presets' activations) or static per tensor, which runs dynamic per token
(finer than the calibrated scale; logged). Activation quantization is the kernels' business
(kernels.act_quant): native on CUDA, emulated on CPU (x quantized per token, then dequantized).
"""

from __future__ import annotations

import logging

import torch

from kernels.layouts import FP8Layout, Int8Layout
from parallel.sharding import LinearShard, TensorSource
from quant.base import KernelLinear, PackedLinear, QuantConfigError
from quant.compressed_tensors.scheme import FormatHandler, Scheme, TensorArgs, register_format
from quant.common.scaled_8bit import FLOAT8, read_scales, read_weight

logger = logging.getLogger(__name__)

FLOAT_QUANTIZED = "float-quantized"
INT_QUANTIZED = "int-quantized"
WEIGHT_STRATEGIES = ("channel", "tensor")
SCALE = ("weight_scale",)


class _EightBit(FormatHandler):
    weight_type: str  # "float" or "int"
    dtype: torch.dtype

    @classmethod
    def check_scheme(cls, scheme: Scheme) -> None:
        where = f"config_groups.{scheme.name}"
        w = scheme.weights
        if w is None:
            raise QuantConfigError(f"{where} has no weights args; {cls.format} stores quantized weights")
        _check_args(w, f"{where}.weights", cls.weight_type, cls.format)
        if w.strategy not in WEIGHT_STRATEGIES:
            raise QuantConfigError(f"{where}.weights.strategy={w.strategy!r} is not supported for {cls.format}; "
                                   f"supported: {', '.join(WEIGHT_STRATEGIES)}")
        if w.dynamic:
            raise QuantConfigError(f"{where}.weights.dynamic={w.dynamic!r}; stored weights must be static")
        if scheme.output_activations is not None:
            raise QuantConfigError(f"{where}.output_activations is set; output quantization is not supported")
        a = scheme.input_activations
        if a is None:
            return
        _check_args(a, f"{where}.input_activations", cls.weight_type, cls.format)
        if a.dynamic is True and a.strategy == "token":
            return
        if a.dynamic is False and a.strategy == "tensor":
            logger.info("%s: static per-tensor input activations run as dynamic per-token ones", where)
            return
        raise QuantConfigError(f"{where}.input_activations (dynamic={a.dynamic!r}, strategy={a.strategy!r}) is not "
                               f"supported; supported: dynamic per-token, or static per-tensor (run per token)")

    def load_linear(self, weights: TensorSource, shard: LinearShard, scheme: Scheme) -> PackedLinear:
        weight = read_weight(weights, shard, self.dtype, self.format)
        w = scheme.weights
        scales = read_scales(weights, shard, SCALE, self.format, per_tensor_ok=w.strategy == "tensor",
                             per_channel_ok=w.strategy == "channel")
        dynamic = scheme.input_activations is not None
        try:
            if self.weight_type == "float":
                layout = FP8Layout(weight, scales, dynamic_act=dynamic)
            else:
                n = weight.shape[0]
                layout = Int8Layout(weight, scales.expand(n).contiguous() if scales.dim() == 0 else scales,
                                    dynamic_act=dynamic)
        except ValueError as e:
            raise QuantConfigError(f"{shard.prefix}: {self.format} tensors do not form a layer: {e}") from None
        return KernelLinear(layout, weights.dtype)


def _check_args(args: TensorArgs, where: str, weight_type: str, fmt: str) -> None:
    if args.type != weight_type or args.num_bits != 8:
        raise QuantConfigError(f"{where} is {args.num_bits}-bit {args.type}; {fmt} holds 8-bit {weight_type} values")
    if not args.symmetric:
        raise QuantConfigError(f"{where}.symmetric=false is not supported for {fmt}; only symmetric 8-bit")


@register_format(FLOAT_QUANTIZED)
class FloatQuantized(_EightBit):
    format = FLOAT_QUANTIZED
    weight_type = "float"
    dtype = FLOAT8


@register_format(INT_QUANTIZED)
class IntQuantized(_EightBit):
    format = INT_QUANTIZED
    weight_type = "int"
    dtype = torch.int8
