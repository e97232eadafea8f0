"""An HQQ quantization_config, as transformers' HqqConfig writes it:

    {"quant_method": "hqq", "skip_modules": ["lm_head"],
     "quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64, "axis": 1, ...}, ...}}

or, per layer tag (the module name without "model", "layers" and layer numbers, e.g.
"self_attn.q_proj"), {"quant_config": {"self_attn.q_proj": {"weight_quant_params": {...}}, ...}}:
a tag not listed stays float. Each quantized layer also stores its own nbits / group_size / axis /
shape as tensors; the loader checks them against what the config says for the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quant.base import QuantConfigError

METHOD = "hqq"
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)  # 5 and 6 are stored like 8 ("8bit_u8")


@dataclass(frozen=True)
class LayerParams:
    nbits: int
    group_size: int | None  # None: one group per output row (channel-wise without groups)
    axis: int
    view_as_float: bool


def linear_tag(module: str) -> str:
    """transformers' tag of a module: "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"."""
    return ".".join(p for p in module.split(".") if p not in ("model", "layers") and not p.isnumeric())


def _params(raw: Any, where: str) -> LayerParams:
    if not isinstance(raw, dict) or not isinstance(raw.get("weight_quant_params"), dict):
        raise QuantConfigError(f"hqq quantization_config {where} must hold a weight_quant_params object, got {raw!r}")
    for key in ("scale_quant_params", "zero_quant_params"):
        if raw.get(key):
            raise QuantConfigError(f"hqq quantization_config {where}.{key} is set: quantized scales/zeros are not "
                                   f"supported (hqq itself does not serialize them)")
    w = raw["weight_quant_params"]
    field = f"{where}.weight_quant_params"
    nbits = w.get("nbits")
    if nbits not in SUPPORTED_BITS or isinstance(nbits, bool):
        raise QuantConfigError(f"hqq quantization_config field {field}.nbits={nbits!r} is not supported; supported: "
                               f"{', '.join(map(str, SUPPORTED_BITS))}")
    if w.get("channel_wise", True) is not True:
        raise QuantConfigError(f"hqq quantization_config field {field}.channel_wise={w.get('channel_wise')!r} is not "
                               f"supported (one scale for the whole tensor); supported: true")
    group_size = w.get("group_size")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise QuantConfigError(f"hqq quantization_config field {field}.group_size={group_size!r} must be a positive "
                               f"integer (or null: one group per row)")
    axis = w.get("axis", 0)
    if axis not in (0, 1):
        raise QuantConfigError(f"hqq quantization_config field {field}.axis={axis!r} must be 0 or 1")
    if axis == 0:
        raise QuantConfigError(
            f"hqq quantization_config field {field}.axis=0 is not supported: axis-0 groups run down the output "
            f"features (each group takes one input column from {group_size} rows spread over the weight), so a "
            f"column-parallel rank would split every group and no kernel layout holds such groups; quantize with "
            f"axis=1 (groups along the input features, transformers' default)")
    return LayerParams(int(nbits), group_size, 1, bool(w.get("view_as_float", False)))


@dataclass(frozen=True)
class HqqConfig:
    default: LayerParams | None  # one config for every quantized layer
    by_tag: dict[str, LayerParams | None]  # per-layer-tag configs (None: that tag stays float)
    skip_modules: tuple[str, ...]

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "HqqConfig":
        skip = config.get("skip_modules", ["lm_head"])
        if skip is None:
            skip = []
        if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
            raise QuantConfigError(f"hqq quantization_config field skip_modules={skip!r} must be a list of module names")
        qc = config.get("quant_config")
        if not isinstance(qc, dict) or not qc:
            raise QuantConfigError(f"hqq quantization_config has no quant_config object (got {qc!r})")
        if "weight_quant_params" in qc:
            return cls(_params(qc, "quant_config"), {}, tuple(skip))
        by_tag = {tag: (None if raw is None else _params(raw, f"quant_config[{tag!r}]")) for tag, raw in qc.items()}
        return cls(None, by_tag, tuple(skip))

    def skipped(self, module: str) -> bool:
        return any(module == m or module.endswith("." + m) or linear_tag(module) == m for m in self.skip_modules)

    def for_layer(self, module: str) -> LayerParams | None:
        """The layer's params; None when the config leaves it float."""
        if self.skipped(module):
            return None
        if self.default is not None:
            return self.default
        return self.by_tag.get(linear_tag(module))

    def describe(self) -> str:
        if self.default is not None:
            p = self.default
            return f"hqq(nbits={p.nbits}, group_size={p.group_size}, axis={p.axis})"
        shown = ", ".join(f"{t}: {p.nbits}-bit g{p.group_size}" for t, p in self.by_tag.items() if p)
        return f"hqq(per layer: {shown})"
