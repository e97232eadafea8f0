"""A GPTQ quantization_config: its fields (as AutoGPTQ, GPTQModel, optimum and TGI spell them),
checked and kept None where the config is silent."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from quant.base import QuantConfigError
from quant.common.config_fields import config_bool, config_field, config_int
from quant.common.packed_layers import PACKED_BITS, check_group_size
from quant.gptq.zeros import FORMATS

logger = logging.getLogger(__name__)

# Formats that GPTQModel/vLLM repack GPTQ into for other kernels: not this layout.
_REPACKED = ("marlin", "gptq_marlin", "bitblas", "ipex", "exllama", "awq")


@dataclass(frozen=True)
class GPTQParams:
    """A GPTQ quantization_config; None where the config is silent (resolved at first load)."""

    bits: int | None
    group_size: int | None
    sym: bool | None
    checkpoint_format: str | None
    desc_act: bool | None

    @classmethod
    def parse(cls, config: dict[str, Any]) -> "GPTQParams":
        bits = config_int(config, ("bits", "w_bit"), None, "gptq")
        if bits is not None:
            check_bits(bits)
        group_size = config_int(config, ("group_size", "groupsize"), None, "gptq")
        if group_size is not None:
            check_group_size(group_size, "gptq")
        if config.get("is_marlin_format"):
            raise QuantConfigError("gptq quantization_config has is_marlin_format=true: Marlin-repacked GPTQ "
                                   "checkpoints are not supported; use the original GPTQ checkpoint")
        fmt = config_field(config, ("checkpoint_format", "format"))
        if fmt is not None:
            if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
                extra = " (repacked for another kernel)" if str(fmt).lower() in _REPACKED else ""
                raise QuantConfigError(f"gptq quantization_config field checkpoint_format={fmt!r}{extra} is not "
                                       f"supported; supported: {', '.join(FORMATS)}")
            fmt = fmt.lower()
        pack_dtype = config.get("pack_dtype")
        if pack_dtype not in (None, "int32", "torch.int32"):
            raise QuantConfigError(f"gptq quantization_config field pack_dtype={pack_dtype!r} is not supported; "
                                   f"supported: int32")
        if config.get("dynamic"):
            logger.warning("gptq quantization_config has per-module 'dynamic' overrides; qshard reads every layer "
                           "with the global bits/group_size (mismatching layers fail their shape check)")
        return cls(bits, group_size, config_bool(config, ("sym",), "gptq"), fmt,
                   config_bool(config, ("desc_act",), "gptq"))


def check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise QuantConfigError(f"gptq quantization_config field bits={bits} is not supported; "
                               f"supported: {', '.join(map(str, PACKED_BITS))}")
