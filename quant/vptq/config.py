"""VPTQ's quantization_config: config_for_layers (by module name) / shared_layer_config (by the
module's last name, e.g. "q_proj"), each layer's fields checked and named when wrong."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from quant.base import QuantConfigError

METHOD = "vptq"


def _int(layer: str, cfg: dict[str, Any], key: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantConfigError(f"vptq layer {layer}: field {key}={value!r} must be an integer")
    return value


def _pair(layer: str, cfg: dict[str, Any], key: str, default: Any = None) -> tuple[int, int]:
    value = cfg.get(key, default)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise QuantConfigError(f"vptq layer {layer}: field {key}={value!r} must be a pair of integers "
                               f"[outlier, main]")
    return int(value[0]), int(value[1])


def _flag(layer: str, cfg: dict[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise QuantConfigError(f"vptq layer {layer}: field {key}={value!r} must be true or false")
    return value


def _bits(layer: str, key: str, count: int) -> int:
    bits = max(1, math.ceil(math.log2(count)))
    if bits > 16:
        raise QuantConfigError(f"vptq layer {layer}: field {key} asks for {count} centroids; at most 2^16 "
                               f"(indices are 16-bit)")
    return bits


@dataclass(frozen=True)
class VptqLayer:
    name: str
    vector_len: int
    num_centroids: int
    num_res_centroids: int  # <= 0: no residual codebook
    outlier_vector_len: int
    num_outlier_centroids: int
    group_num: int
    group_size: int
    outlier_size: int
    indices_as_float: bool
    enable_norm: bool
    enable_perm: bool
    is_indice_packed: bool

    @property
    def has_residual(self) -> bool:
        return self.num_res_centroids > 0

    @property
    def has_outliers(self) -> bool:  # as VPTQ decides it
        return self.outlier_vector_len > 1 and self.num_outlier_centroids > 0

    @property
    def outlier_cols(self) -> int:
        return self.outlier_size if self.has_outliers else 0

    @property
    def index_bits(self) -> int:
        return _bits(self.name, "num_centroids", self.num_centroids)

    @property
    def res_bits(self) -> int:
        return _bits(self.name, "num_res_centroids", self.num_res_centroids) if self.has_residual else 0

    @classmethod
    def parse(cls, name: str, cfg: dict[str, Any]) -> "VptqLayer":
        if not isinstance(cfg, dict):
            raise QuantConfigError(f"vptq layer {name}: its config must be an object, got {cfg!r}")
        ovl, vl = _pair(name, cfg, "vector_lens")
        n_out, n = _pair(name, cfg, "num_centroids")
        r_out, r = _pair(name, cfg, "num_res_centroids", [-1, -1])
        layer = cls(name, vl, n, r, ovl, n_out, _int(name, cfg, "group_num", 1), _int(name, cfg, "group_size"),
                    _int(name, cfg, "outlier_size", 0), _flag(name, cfg, "indices_as_float", False),
                    _flag(name, cfg, "enable_norm", True), _flag(name, cfg, "enable_perm", True),
                    _flag(name, cfg, "is_indice_packed", True))
        if cfg.get("vector_quant_dim", "out") != "out":
            raise QuantConfigError(f"vptq layer {name}: field vector_quant_dim={cfg['vector_quant_dim']!r} is not "
                                   f"supported (VPTQ implements 'out' only)")
        if vl < 1 or n < 1:
            raise QuantConfigError(f"vptq layer {name}: fields vector_lens={[ovl, vl]} / num_centroids={[n_out, n]} "
                                   f"need a positive main vector length and centroid count")
        if layer.group_num < 1 or layer.group_size < 1 or layer.outlier_size < 0:
            raise QuantConfigError(f"vptq layer {name}: fields group_num={layer.group_num}, group_size="
                                   f"{layer.group_size}, outlier_size={layer.outlier_size} must be positive")
        if layer.has_outliers and r_out != -1:
            raise QuantConfigError(f"vptq layer {name}: field num_res_centroids[0]={r_out}: residual "
                                   f"quantization of outliers is not supported (nor by VPTQ)")
        if layer.is_indice_packed and layer.index_bits + layer.res_bits > 32:
            raise QuantConfigError(f"vptq layer {name}: {layer.index_bits} + {layer.res_bits} index bits exceed "
                                   f"a 32-bit packed entry")
        _ = layer.index_bits, layer.res_bits  # range checks
        return layer

    def to_config(self) -> dict[str, Any]:
        return {"vector_lens": [self.outlier_vector_len, self.vector_len],
                "num_centroids": [self.num_outlier_centroids, self.num_centroids],
                "num_res_centroids": [-1, self.num_res_centroids], "group_num": self.group_num,
                "group_size": self.group_size, "outlier_size": self.outlier_size,
                "indices_as_float": self.indices_as_float, "enable_norm": self.enable_norm,
                "enable_perm": self.enable_perm, "is_indice_packed": self.is_indice_packed}


@dataclass(frozen=True)
class VptqParams:
    layers: dict[str, VptqLayer]
    shared: dict[str, VptqLayer]
    not_converted: tuple[str, ...]

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "VptqParams":
        if config.get("enable_proxy_error"):
            raise QuantConfigError("vptq quantization_config field enable_proxy_error=true is for training; "
                                   "inference checkpoints have it false")
        per_layer, shared = config.get("config_for_layers") or {}, config.get("shared_layer_config") or {}
        for key, value in (("config_for_layers", per_layer), ("shared_layer_config", shared)):
            if not isinstance(value, dict):
                raise QuantConfigError(f"vptq quantization_config field {key} must be an object by module name")
        skip = config.get("modules_to_not_convert") or ()
        return cls({k: VptqLayer.parse(k, v) for k, v in per_layer.items()},
                   {k: VptqLayer.parse(k, v) for k, v in shared.items()}, tuple(skip))

    def layer(self, module: str) -> VptqLayer | None:
        """A module's config: by full name, else shared by its last name component, else by its
        second one (the lookup transformers' replace_with_vptq_linear does)."""
        found = self.layers.get(module)
        if found is None:
            parts = module.split(".")
            found = self.shared.get(parts[-1]) or (self.shared.get(parts[1]) if len(parts) > 1 else None)
        return found
