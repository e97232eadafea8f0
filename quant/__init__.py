"""Quantization formats, one folder each (quant/<format>/: config parsing, loader, packer), found
through the one table in quant.registry; `get_loader` picks the loader serving a checkpoint.

Importing `quant` imports no format: a loader module is imported when a checkpoint asks for it,
and packers, export and calibration only by the paths that write checkpoints.
"""

from __future__ import annotations

from typing import Any

from quant.base import Packer, PackedLinear, QuantConfigError, WeightsLoader, register, registered_methods
from quant.registry import loader_class


def get_loader(quantization_config: dict[str, Any] | None) -> WeightsLoader:
    """The loader for a checkpoint's quantization_config (None: unquantized)."""
    if not quantization_config:
        return loader_class("none").from_config({})
    method = quantization_config.get("quant_method")
    if not isinstance(method, str):
        raise QuantConfigError(f"quantization_config has no quant_method string (got {method!r}); "
                               f"supported: {', '.join(registered_methods())}")
    return loader_class(method.lower()).from_config(quantization_config)


__all__ = ["Packer", "PackedLinear", "QuantConfigError", "WeightsLoader", "get_loader", "register", "registered_methods"]
