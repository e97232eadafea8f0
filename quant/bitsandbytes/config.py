"""The quantization_config fields of a bitsandbytes checkpoint (transformers' BitsAndBytesConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quant.base import QuantConfigError

METHOD = "bitsandbytes"
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class BnbConfig:
    bits: int  # 4 or 8
    quant_type: str  # "nf4" | "fp4" (4-bit only)
    skip_modules: tuple[str, ...]  # llm_int8_skip_modules: layers left in float

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "BnbConfig":
        def flag(key: str) -> bool:
            value = config.get(key, config.get(f"_{key}", False))  # transformers writes both spellings
            if not isinstance(value, bool):
                raise QuantConfigError(f"bitsandbytes quantization_config field {key}={value!r} must be true or false")
            return value

        four, eight = flag("load_in_4bit"), flag("load_in_8bit")
        if four == eight:
            raise QuantConfigError(f"bitsandbytes quantization_config must set exactly one of load_in_4bit / "
                                   f"load_in_8bit (got load_in_4bit={four}, load_in_8bit={eight}); supported bits: 4, 8")
        if eight and config.get("llm_int8_has_fp16_weight"):
            raise QuantConfigError("bitsandbytes quantization_config field llm_int8_has_fp16_weight=true: the "
                                   "checkpoint keeps float weights for training; qshard reads int8 (SCB) weights")
        quant_type = config.get("bnb_4bit_quant_type", "fp4")
        if four and quant_type not in QUANT_TYPES:
            raise QuantConfigError(f"bitsandbytes quantization_config field bnb_4bit_quant_type={quant_type!r} is "
                                   f"not supported; supported: {', '.join(QUANT_TYPES)}")
        skip = config.get("llm_int8_skip_modules") or []
        if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
            raise QuantConfigError(f"bitsandbytes quantization_config field llm_int8_skip_modules={skip!r} must be "
                                   f"a list of module names")
        return cls(4 if four else 8, quant_type if four else "int8", tuple(skip))

    def describe(self) -> str:
        return f"bitsandbytes {self.quant_type}" if self.bits == 4 else "bitsandbytes LLM.int8 (SCB)"
