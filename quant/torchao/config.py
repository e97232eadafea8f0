"""A torchao quantization_config, as transformers' TorchAoConfig writes it for safetensors:

    {"quant_method": "torchao", "modules_to_not_convert": [...] | null,
     "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {...}}}}

Weight-only configs map to one tensor subclass each, stored as `{module}._weight_{attr}`:
- Int8WeightOnlyConfig -> Int8Tensor: qdata int8 [N, K], scale float [N, G], zero_point int8 [N, G]
  (PerRow: G = 1; PerGroup(g): G = K / g); w = (q - zero_point) * scale.
- Float8WeightOnlyConfig -> Float8Tensor: qdata float8_e4m3fn [N, K], scale float [N, 1] (PerRow) or
  [1, 1] (PerTensor); w = q * scale.
- Int4WeightOnlyConfig(int4_packing_format "plain") -> Int4Tensor: qdata int8 [N, K/2] (k even in
  the low nibble, signed codes in [-8, 7]), scale and zero_point [K/g, N]; w = q * scale + zero_point.
- Int4WeightOnlyConfig("tile_packed_to_4d") -> Int4TilePackedTo4dTensor: qdata int32
  [N'/8, K'/128, 32, 4] (tinygemm's layout, N' and K' padded to 8 and 1024), scale_and_zero
  [K'/g, N', 2]; w = (u - 8) * scale + zero with u in [0, 15].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quant.base import QuantConfigError

METHOD = "torchao"
INT8, FLOAT8, INT4_PLAIN, INT4_TILE = "int8", "float8", "int4-plain", "int4-tile-packed"
_CONFIGS = {"Int8WeightOnlyConfig": INT8, "Float8WeightOnlyConfig": FLOAT8, "Int4WeightOnlyConfig": None}
INT4_FORMATS = {"plain": INT4_PLAIN, "tile_packed_to_4d": INT4_TILE}


@dataclass(frozen=True)
class TorchaoConfig:
    kind: str
    group_size: int | None  # int4 / PerGroup int8: columns per group; None: per row (or per tensor)
    ignored: tuple[str, ...]

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "TorchaoConfig":
        ignored = config.get("modules_to_not_convert") or []
        if not isinstance(ignored, list) or not all(isinstance(m, str) for m in ignored):
            raise QuantConfigError(f"torchao quantization_config field modules_to_not_convert={ignored!r} must be a "
                                   f"list of module names")
        qt = config.get("quant_type")
        if isinstance(qt, str):
            raise QuantConfigError(f"torchao quantization_config field quant_type={qt!r} is a legacy name: those "
                                   f"checkpoints are pickled tensor subclasses, which qshard does not load; save "
                                   f"with a torchao config object (safetensors)")
        if not isinstance(qt, dict) or set(qt) != {"default"}:
            keys = sorted(qt) if isinstance(qt, dict) else qt
            raise QuantConfigError(f"torchao quantization_config field quant_type must be {{'default': config}}, got "
                                   f"{keys!r} (per-module configs are not supported)")
        raw = qt["default"]
        kind_name = raw.get("_type") if isinstance(raw, dict) else None
        data = raw.get("_data", {}) if isinstance(raw, dict) else {}
        if kind_name not in _CONFIGS:
            raise QuantConfigError(f"torchao quantization_config field quant_type.default._type={kind_name!r} is not "
                                   f"supported; supported: {', '.join(_CONFIGS)}")
        if kind_name == "Int4WeightOnlyConfig":
            fmt = data.get("int4_packing_format", "plain")
            fmt = fmt.get("_data", "").lower() if isinstance(fmt, dict) else str(fmt).lower()
            if fmt not in INT4_FORMATS:
                raise QuantConfigError(f"torchao quantization_config field quant_type.default._data.int4_packing_format="
                                       f"{fmt!r} is not supported; supported: {', '.join(INT4_FORMATS)}")
            gs = data.get("group_size", 128)
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise QuantConfigError(f"torchao quantization_config field quant_type.default._data.group_size={gs!r} "
                                       f"must be a positive integer")
            return cls(INT4_FORMATS[fmt], gs, tuple(ignored))
        if kind_name == "Float8WeightOnlyConfig":
            wd = data.get("weight_dtype", {})
            wd = wd.get("_data") if isinstance(wd, dict) else wd
            if wd not in (None, "float8_e4m3fn"):
                raise QuantConfigError(f"torchao quantization_config field quant_type.default._data.weight_dtype={wd!r}"
                                       f" is not supported; supported: float8_e4m3fn")
        granularity = data.get("granularity") or {}
        gname = granularity.get("_type") if isinstance(granularity, dict) else None
        if gname in (None, "PerRow", "PerTensor"):
            return cls(_CONFIGS[kind_name], None, tuple(ignored))
        if gname == "PerGroup" and kind_name == "Int8WeightOnlyConfig":
            gs = granularity.get("_data", {}).get("group_size")
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise QuantConfigError(f"torchao quantization_config field quant_type.default._data.granularity."
                                       f"group_size={gs!r} must be a positive integer")
            return cls(INT8, gs, tuple(ignored))
        raise QuantConfigError(f"torchao quantization_config field quant_type.default._data.granularity={gname!r} is "
                               f"not supported for {kind_name}; supported: PerRow, PerTensor"
                               f"{', PerGroup' if kind_name == 'Int8WeightOnlyConfig' else ''}")

    def describe(self) -> str:
        return f"torchao({self.kind}{f', group_size={self.group_size}' if self.group_size else ''})"
