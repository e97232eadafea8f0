"""AQLM's quantization_config (transformers AqlmConfig): its fields, checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quant.base import QuantConfigError

METHOD = "aqlm"
MAX_CODEBOOK_BITS = 16  # codes are int16 on disk; 2^16-entry codebooks are the largest AQLM writes
MAX_CODEBOOKS = 8


def _positive_int(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QuantConfigError(f"aqlm quantization_config field {key}={value!r} must be a positive integer")
    return value


@dataclass(frozen=True)
class AqlmParams:
    in_group_size: int
    out_group_size: int
    num_codebooks: int
    nbits_per_codebook: int
    not_quantized: tuple[str, ...]  # linear_weights_not_to_quantize: "<module>.weight" names

    @property
    def codebook_size(self) -> int:
        return 1 << self.nbits_per_codebook

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "AqlmParams":
        # defaults as transformers' AqlmConfig (1x16, in-groups of 8, out-groups of 1)
        params = cls(_positive_int(config, "in_group_size", 8), _positive_int(config, "out_group_size", 1),
                     _positive_int(config, "num_codebooks", 1), _positive_int(config, "nbits_per_codebook", 16),
                     tuple(config.get("linear_weights_not_to_quantize") or ()))
        if params.nbits_per_codebook > MAX_CODEBOOK_BITS:
            raise QuantConfigError(f"aqlm quantization_config field nbits_per_codebook={params.nbits_per_codebook} "
                                   f"is not supported: codebooks of up to 2^{MAX_CODEBOOK_BITS} entries "
                                   f"(1x16, 2x8, 1x8 and the like)")
        if params.num_codebooks > MAX_CODEBOOKS:
            raise QuantConfigError(f"aqlm quantization_config field num_codebooks={params.num_codebooks} is not "
                                   f"supported: at most {MAX_CODEBOOKS}")
        if not all(isinstance(n, str) for n in params.not_quantized):
            raise QuantConfigError(f"aqlm quantization_config field linear_weights_not_to_quantize="
                                   f"{list(params.not_quantized)!r} must be a list of weight names")
        return params

    def to_config(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "in_group_size": self.in_group_size, "out_group_size": self.out_group_size,
                "num_codebooks": self.num_codebooks, "nbits_per_codebook": self.nbits_per_codebook,
                "linear_weights_not_to_quantize": list(self.not_quantized)}
