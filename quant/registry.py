"""Every format qshard reads, by quant_method: the one table `quant.get_loader` consults.

Adding a format is one line in FORMATS (keep them sorted by folder):

    "<quant_method>": Format("quant.<folder>.loader:<LoaderClass>", "quant.<folder>.packer:<PackerClass>"),

the second path optional (None: qshard reads the format but does not write it). Paths are imported
lazily: `loader_class` imports only the loader module a checkpoint asks for, and `packer_class`
(writing paths: quantize, export, dummy/random weights) only its packer module, so importing a
loader never imports a packer, export or calibration code. A loader class may carry
`@quant.base.register("<quant_method>")`, which checks that this table points at it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quant.base import Packer, WeightsLoader


@dataclass(frozen=True)
class Format:
    loader: str  # "module:Class" of its WeightsLoader
    packer: str | None = None  # "module:Class" of its Packer, None when qshard does not write it


FORMATS: dict[str, Format] = {
    "aqlm": Format("quant.aqlm.loader:AqlmLoader", "quant.aqlm.packer:AqlmPacker"),
    "awq": Format("quant.awq.loader:AWQLoader", "quant.awq.packer:AWQPacker"),
    "bitsandbytes": Format("quant.bitsandbytes.loader:BnbLoader", "quant.bitsandbytes.packer:BnbPacker"),
    "compressed-tensors": Format("quant.compressed_tensors.loader:CompressedTensorsLoader",
                                 "quant.compressed_tensors.packer:CompressedTensorsPacker"),
    "exl2": Format("quant.exl2.loader:Exl2Loader", "quant.exl2.packer:Exl2Packer"),
    "fp8": Format("quant.fp8.loader:Fp8Loader"),
    "fbgemm_fp8": Format("quant.fp8.loader:FbgemmFp8Loader"),
    "gptq": Format("quant.gptq.loader:GPTQLoader", "quant.gptq.packer:GPTQPacker"),
    "hqq": Format("quant.hqq.loader:HqqLoader", "quant.hqq.packer:HqqPacker"),
    "eetq": Format("quant.int8.loader:EetqLoader"),
    "marlin": Format("quant.marlin.loader:MarlinLoader", "quant.marlin.packer:MarlinPacker"),
    "quanto": Format("quant.quanto.loader:QuantoLoader", "quant.quanto.packer:QuantoPacker"),
    "none": Format("quant.unquantized.loader:UnquantizedLoader"),
    "torchao": Format("quant.torchao.loader:TorchaoLoader", "quant.torchao.packer:TorchaoPacker"),
    "vptq": Format("quant.vptq.loader:VptqLoader", "quant.vptq.packer:VptqPacker"),
}


def method_names() -> list[str]:
    return sorted(FORMATS)


def _entry(method: str) -> Format:
    from quant.base import QuantConfigError

    try:
        return FORMATS[method]
    except KeyError:
        raise QuantConfigError(f"unsupported quant_method {method!r}; supported: {', '.join(method_names())}") from None


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def loader_class(method: str) -> "type[WeightsLoader]":
    return _import(_entry(method).loader)


def packer_class(method: str) -> "type[Packer]":
    from quant.base import QuantConfigError

    path = _entry(method).packer
    if path is None:
        writable = [m for m in method_names() if FORMATS[m].packer]
        raise QuantConfigError(f"qshard reads quant_method {method!r} but does not write it; it writes: "
                               f"{', '.join(writable)}")
    return _import(path)
