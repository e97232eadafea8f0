"""FP8 checkpoints: `quant_method: "fp8"` (vLLM / transformers style) and `"fbgemm_fp8"`.

Config facts:
- fp8: `activation_scheme` "dynamic" (default) or "static" (a calibrated per-tensor `input_scale`
  is stored per layer), `ignored_layers` (vLLM) / `modules_to_not_convert` (transformers): layers
  left in float, and `weight_block_size` [bn, bk] for block-wise scales (DeepSeek-V3 style), which
  is refused here.
- fbgemm_fp8 (transformers' FbgemmFp8Config): per-channel `weight_scale` [N, 1], activations
  quantized per token with the token's amax capped at `activation_scale_ub` (default 1200),
  `modules_to_not_convert`.
Tensors per layer: `weight` float8_e4m3fn [N, K] and its dequantization multiplier, w = q * scale:
`weight_scale` (vLLM, fbgemm) or `weight_scale_inv` (DeepSeek / transformers' fine-grained FP8: the
inverse of the quantization scale, so it too multiplies), per tensor ([] / [1]) or per channel
([N] / [N, 1]). Layers stored as 16/32-bit floats without a scale (lm_head) load as float.

Compute: FP8Layout with dynamic per-token FP8 activations (kernels.act_quant: native on CUDA
sm >= 89, 16-bit activations on older GPUs, emulated on CPU). "static" runs the same dynamic
per-token activations (a finer scale than the stored per-tensor one); `input_scale` is checked
(one positive value per layer) but not used, as logged.
"""

from __future__ import annotations

import logging
from typing import Any

from kernels.layouts import FP8Layout
from parallel.sharding import Axis, LinearShard, Role, TensorSource, tensor_name
from quant.base import KernelLinear, PackedLinear, QuantConfigError, WeightsLoader, register
from quant.common.config_fields import config_field
from quant.common.scaled_8bit import FLOAT8, dense_or_none, read_scales, read_weight

logger = logging.getLogger(__name__)

ACTIVATION_SCHEMES = ("dynamic", "static")
SCALE_NAMES = ("weight_scale", "weight_scale_inv")
INPUT_SCALE = Role("input_scale", (Axis.FULL,))
DEFAULT_SCALE_UB = 1200.0  # transformers' FbgemmFp8Config.activation_scale_ub


def _string_list(config: dict[str, Any], key: str, method: str) -> list[str]:
    value = config.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QuantConfigError(f"{method} quantization_config field {key}={value!r} must be a list of module names")
    return value


class _Fp8Base(WeightsLoader):
    scale_names: tuple[str, ...] = SCALE_NAMES
    per_tensor_ok = True

    def __init__(self, ignored: list[str], static: bool = False, scale_ub: float | None = None):
        self.ignored, self.static, self.scale_ub = ignored, static, scale_ub

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        dense = dense_or_none(weights, shard, self.ignored, self.scale_names, FLOAT8, self.method)
        if dense is not None:
            return dense
        weight = read_weight(weights, shard, FLOAT8, self.method)
        scales = read_scales(weights, shard, self.scale_names, self.method, per_tensor_ok=self.per_tensor_ok)
        if self.static:
            _check_input_scales(weights, shard)
        layout = FP8Layout(weight, scales, dynamic_act=True, act_scale_ub=self.scale_ub)
        return KernelLinear(layout, weights.dtype)


@register("fp8")
class Fp8Loader(_Fp8Base):
    method = "fp8"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Fp8Loader":
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise QuantConfigError(f"fp8 quantization_config field activation_scheme={scheme!r} is unknown; "
                                   f"supported: {', '.join(ACTIVATION_SCHEMES)}")
        block = config.get("weight_block_size")
        if block is not None:
            raise QuantConfigError(f"fp8 quantization_config field weight_block_size={block!r}: block-wise FP8 "
                                   f"scales are not supported (per-tensor and per-channel are)")
        fmt = config_field(config, ("fmt",))
        if fmt is not None and fmt != "e4m3":
            raise QuantConfigError(f"fp8 quantization_config field fmt={fmt!r} is not supported; supported: e4m3")
        ignored = _string_list(config, "ignored_layers", "fp8") + _string_list(config, "modules_to_not_convert", "fp8")
        if scheme == "static":
            logger.info("fp8 activation_scheme 'static': activations are quantized per token at run time; the "
                        "stored per-tensor input_scale is checked, not used")
        return cls(ignored, static=scheme == "static")

    def describe(self) -> str:
        return f"fp8 (e4m3 weights, {'static' if self.static else 'dynamic'} activations run per token)"


@register("fbgemm_fp8")
class FbgemmFp8Loader(_Fp8Base):
    method = "fbgemm_fp8"
    scale_names = ("weight_scale",)
    per_tensor_ok = False  # FBGEMM stores per-channel [N, 1] scales

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FbgemmFp8Loader":
        ub = config.get("activation_scale_ub", DEFAULT_SCALE_UB)
        if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not ub > 0:
            raise QuantConfigError(f"fbgemm_fp8 quantization_config field activation_scale_ub={ub!r} must be a "
                                   f"positive number")
        return cls(_string_list(config, "modules_to_not_convert", "fbgemm_fp8"), scale_ub=float(ub))

    def describe(self) -> str:
        return f"fbgemm_fp8 (e4m3 per-channel weights, per-token activations, amax <= {self.scale_ub:g})"


def _check_input_scales(weights: TensorSource, shard: LinearShard) -> None:
    for src in shard.sources:
        name = tensor_name(src, INPUT_SCALE.suffix)
        if not weights.has(name):
            raise QuantConfigError(f"tensor {name} is missing: fp8 activation_scheme 'static' stores one per layer")
        s = weights.read(name, (Ellipsis,)).float()
        if s.numel() != 1 or not bool((s > 0).all()):
            raise QuantConfigError(f"tensor {name} has shape {list(s.shape)} (values {s.flatten()[:4].tolist()}); "
                                   f"expected one positive per-tensor scale")
