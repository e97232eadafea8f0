"""Writing optimum-quanto layers (the inverse of quant.quanto.loader), and random quanto weights,
as QuantizedModelForCausalLM saves them (quant.quanto.tensors lists the tensors).

qint2 / qint4 are written with integer (uint8) zero points, quanto's affine form
w = scale * (q - shift) (what its MaxOptimizer gives with zeropoint=True): a QuantResult's codes,
scales and zeros, exactly. quanto does not store the group size and recomputes it when it loads,
so the packer writes quanto's own (`quanto_group_size`). qint8 is symmetric per channel,
w = scale * data: a QuantResult of 8 bits, one group per row and zero point 128. qfloat8 is not
written. Scales are in the checkpoint dtype, as quanto keeps them in the weight's.
"""

from __future__ import annotations

from typing import Any

import torch

from quant.base import Packer, QuantConfigError
from quant.common.random_weights import RandomTensor, uniform_code_scale
from quant.quanto.config import CONFIG_TYPES, METHOD, WEIGHT_TYPES, QuantoConfig

WRITTEN = ("qint2", "qint4", "qint8")
_CONFIG_NAME = {q: name for name, q in CONFIG_TYPES.items()}  # qint4 -> transformers' "int4"


def quanto_group_size(in_features: int) -> int:
    """quanto's qint2/qint4 group size for a layer (QModuleMixin): 128, less 32 until it divides K
    (not below 32); K itself (per channel) when K <= 128 or none divides."""
    gs = 128
    if in_features > gs:
        while in_features % gs and gs > 32:
            gs -= 32
        if in_features % gs == 0:
            return gs
    return in_features


def pack_group_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [G, gs] -> uint8 [ceil(G / v), gs] (v = 8 / bits): run i of the rows in bits
    [i*bits, (i+1)*bits) of each byte, the last run zero-padded (quant.quanto.tensors)."""
    per_byte = 8 // bits
    runs = -(-codes.shape[0] // per_byte)
    padded = torch.zeros(per_byte * runs, codes.shape[1], dtype=torch.int32)
    padded[: codes.shape[0]] = codes.to(torch.int32)
    out = torch.zeros(runs, codes.shape[1], dtype=torch.int32)
    for i in range(per_byte):
        out |= padded[i * runs:(i + 1) * runs] << (bits * i)
    return out.to(torch.uint8)


class QuantoPacker(Packer):
    method = METHOD

    def __init__(self, weights: str = "qint4", not_converted: tuple[str, ...] = ("lm_head",),
                 config: QuantoConfig | None = None):
        if weights not in WRITTEN:
            raise QuantConfigError(f"quanto weights={weights!r} is not written; qshard writes {', '.join(WRITTEN)}")
        self.qtype = weights
        self.not_converted = tuple(not_converted)
        self.config = config  # for_config: which layers random weights quantize, and to what

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "QuantoPacker":
        parsed = QuantoConfig.parse(config)
        types = sorted(set(parsed.qmap.values())) if parsed.qmap is not None else [parsed.default]
        unwritten = [t for t in types if t not in WRITTEN]
        if unwritten:
            raise QuantConfigError(f"{parsed.source} asks for quanto weights {', '.join(unwritten)}; qshard writes "
                                   f"{', '.join(WRITTEN)}")
        return cls(types[0] if len(types) == 1 else "qint4", parsed.not_converted, parsed)

    def _check(self, prefix: str, result, bits: int, gs: int, why: str) -> None:
        if (result.bits, result.group_size) != (bits, gs):
            raise QuantConfigError(f"{prefix}: quantized with bits={result.bits}, group_size={result.group_size} but "
                                   f"quanto {self.qtype} stores bits={bits}, group_size={gs} ({why})")
        if not result.has_trivial_g_idx:
            raise QuantConfigError(f"{prefix}: act-order (a permuted g_idx) cannot be written as quanto, which has "
                                   f"no g_idx")

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k = result.codes.shape
        bits = WEIGHT_TYPES[self.qtype][0]
        out = {}
        if bits == 8:
            self._check(prefix, result, 8, k, "one scale per output row")
            if not bool((result.zeros == 128).all()):
                raise QuantConfigError(f"{prefix}: quanto qint8 is symmetric (w = scale * data, zero point 128); "
                                       f"quantize with sym=True")
            out["weight._data"] = (result.codes - 128).to(torch.int8)
            out["weight._scale"] = result.scales.reshape(n, 1).to(dtype)
        else:
            gs = quanto_group_size(k)
            self._check(prefix, result, bits, gs, f"quanto's group size for in_features={k}: 128, less 32 until it "
                                                   f"divides, else per channel")
            out["weight._data._data"] = pack_group_rows(result.codes.reshape(n * k // gs, gs), bits)
            out["weight._scale"] = result.scales.reshape(-1, 1).to(dtype)
            out["weight._shift"] = result.zeros.reshape(-1, 1).to(torch.uint8)
        out["input_scale"] = torch.ones((), dtype=dtype)  # activation scales quanto saves (unused: float activations)
        out["output_scale"] = torch.ones((), dtype=dtype)
        return {f"{prefix}.{key}": value.contiguous() for key, value in out.items()}

    def _layer_type(self, prefix: str) -> str | None:
        if self.config is not None:
            return self.config.weight_type(prefix)
        skipped = any(prefix == m or prefix.endswith("." + m) for m in self.not_converted)
        return None if skipped else self.qtype

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, RandomTensor]:
        """Random codes, uint8 zero points at mid-range (qint2/qint4) and scales giving `weight_std`;
        a layer the config leaves float gets a float weight."""
        n, k = out_features, in_features
        qtype = self._layer_type(prefix)
        if qtype is None:
            return {f"{prefix}.weight": RandomTensor((n, k), "uniform", weight_std * 3 ** 0.5)}
        if qtype not in WRITTEN:
            raise QuantConfigError(f"random quanto weights are {', '.join(WRITTEN)}, not {qtype} (layer {prefix})")
        bits = WEIGHT_TYPES[qtype][0]
        scale = uniform_code_scale(bits, weight_std)
        if bits == 8:
            out = {"weight._data": RandomTensor((n, k), "codes", dtype=torch.int8),
                   "weight._scale": RandomTensor((n, 1), "scales", scale)}
        else:
            gs = quanto_group_size(k)
            groups = n * k // gs
            out = {"weight._data._data": RandomTensor((-(-groups // (8 // bits)), gs), "codes", dtype=torch.uint8),
                   "weight._scale": RandomTensor((groups, 1), "scales", scale),
                   "weight._shift": RandomTensor((groups, 1), "const", 1 << (bits - 1), torch.uint8)}
        out["input_scale"] = RandomTensor((), "ones")
        out["output_scale"] = RandomTensor((), "ones")
        return {f"{prefix}.{key}": value for key, value in out.items()}

    def quantization_config(self) -> dict[str, Any]:
        """As transformers' QuantoConfig writes it (one weight type for every quantized linear)."""
        return {"quant_method": METHOD, "weights": _CONFIG_NAME[self.qtype], "activations": None,
                "modules_to_not_convert": list(self.not_converted) or None}
