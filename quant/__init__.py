"""Quantization formats, one module each; `get_loader` picks the module serving a checkpoint."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from quant.base import (Packer, PackedLinear, QuantConfigError, WeightsLoader, loader_class, register,
                        registered_methods)

# Importing every module of this package registers its loader: adding a format is adding a file.
for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")


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
