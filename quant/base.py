"""The one interface between a quantization format and the rest of qshard.

A `WeightsLoader` knows its format's tensors and packing. Given a `LinearShard` (what this rank
owns of a layer, from `parallel.sharding`) it reads the rank's slices through the checkpoint's
`TensorSource` and returns a `PackedLinear`: the rank's tensors plus the matmul that reads them.
Nothing outside `quant/` knows any format; a new format is one folder `quant/<format>/` (its
config parsing, loader and packer) plus one line in `quant.registry`.
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

import kernels

from parallel.sharding import LinearShard, TensorSource
from kernels.errors import QShardError

if TYPE_CHECKING:
    from quant.common.random_weights import RandomTensor


class QuantConfigError(QShardError, ValueError):
    """A quantization_config field or a quantized tensor is unsupported or inconsistent."""


class PackedLinear(nn.Module, abc.ABC):
    """One rank's weight of a linear layer in its stored (possibly packed) form; y = x W^T.

    in_features / out_features are the rank's logical sizes. Bias is the parallel layer's business.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The weight as a float32 [out_features, in_features] tensor (tests, fallbacks)."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# Whether a KernelLinear keeps its canonical layout beside the backend's repacked form (so that
# dequantize() works on every backend: tests). The engine loads under `layouts_dropped()`: a
# repacking backend (cpu-amx/int4/int8) then holds the rank's weights once, not twice, and the layout's
# tensors (views of the checkpoint's memory map) stop counting in the rank's resident set.
_KEEP_LAYOUT: ContextVar[bool] = ContextVar("qshard_keep_layout", default=True)


@contextmanager
def layouts_dropped():
    token = _KEEP_LAYOUT.set(False)
    try:
        yield
    finally:
        _KEEP_LAYOUT.reset(token)


class KernelLinear(PackedLinear):
    """A PackedLinear over one of the kernels' canonical layouts: `kernels.prepare` once at load
    (repacking for the device's fastest backend), `kernels.linear` per call."""

    def __init__(self, layout, act_dtype: torch.dtype):
        super().__init__(layout.in_features, layout.out_features)
        self.layout_name = type(layout).__name__
        self.prepared = kernels.prepare(layout, act_dtype, keep_layout=_KEEP_LAYOUT.get())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.prepared)

    def dequantize(self) -> torch.Tensor:
        return self.prepared.dequantize()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout_name}, backend={type(self.prepared).__name__}"


class WeightsLoader(abc.ABC):
    """Reads one rank's part of each linear layer of a checkpoint in one format."""

    method: ClassVar[str]  # the quantization_config's quant_method this loader serves

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict[str, Any]) -> "WeightsLoader":
        """Parse and validate a quantization_config (None-free dict)."""

    @abc.abstractmethod
    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        """The rank's PackedLinear for the layer described by `shard`."""

    def compute_dtype(self, requested: torch.dtype, device: torch.device) -> torch.dtype:
        """The activation dtype this format computes in, given what the user asked for."""
        return requested

    def describe(self) -> str:
        return self.method


class Packer(abc.ABC):
    """Writes quantized layers in one format (the inverse of its loader), for `quant.export`.

    `pack` takes a `quant.calibrate.args.QuantResult` (unsigned codes, true zero points, g_idx)
    and returns the format's tensors for that layer, named `{prefix}.{suffix}`.
    """

    method: ClassVar[str]

    @abc.abstractmethod
    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def quantization_config(self) -> dict[str, Any]:
        """The config.json `quantization_config` describing what `pack` wrote."""

    def extra_files(self) -> list[tuple[str, str]]:
        """(file name, text) written beside config.json (e.g. quantize_config.json)."""
        return []

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "Packer":
        """The packer writing what a quantization_config describes (random weights of that shape)."""
        raise QuantConfigError(f"the {cls.method} packer cannot be built from a quantization_config")

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, "RandomTensor"]:
        """Random weights of one layer in this format, named `{prefix}.{suffix}`, whose dequantized
        weight has about `weight_std` (quant.common.random_weights says how they are described)."""
        raise QuantConfigError(f"random weights are not available in the {self.method} format")


def register(*methods: str):
    """Class decorator naming the quant_method(s) a loader serves. The table that finds loaders is
    quant.registry; this checks, when the module is imported, that the table points here."""

    def wrap(cls: type[WeightsLoader]) -> type[WeightsLoader]:
        from quant.registry import FORMATS

        here = f"{cls.__module__}:{cls.__qualname__}"
        for m in methods:
            listed = FORMATS.get(m)
            if listed is None or listed.loader != here:
                raise RuntimeError(f"quant_method {m!r} is served by {here} but quant.registry lists "
                                   f"{listed.loader if listed else 'nothing'} for it")
        return cls

    return wrap


def registered_methods() -> list[str]:
    from quant.registry import method_names

    return method_names()


def loader_class(method: str) -> type[WeightsLoader]:
    from quant.registry import loader_class as find

    return find(method)
