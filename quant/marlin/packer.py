"""Writing Marlin checkpoints (the inverse of quant.marlin.loader)."""

from __future__ import annotations

from typing import Any

import torch

from quant.base import Packer, QuantConfigError
from quant.marlin.layout import BITS, GROUP_SIZES, ZERO, check_shape, encode_codes, encode_scales

METHOD = "marlin"


class MarlinPacker(Packer):
    """Writes Marlin layers (B, s) from symmetric 4-bit results with group size 128 or -1."""

    method = METHOD

    def __init__(self, group_size: int = 128):
        if group_size not in GROUP_SIZES:
            raise QuantConfigError(f"Marlin stores group_size 128 or -1, not {group_size}")
        self.group_size = group_size

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k = result.codes.shape
        want_group = k if self.group_size == -1 else self.group_size
        if (result.bits, result.sym, result.group_size) != (BITS, True, want_group):
            raise QuantConfigError(f"{prefix}: quantized with bits={result.bits}, sym={result.sym}, group_size="
                             f"{result.group_size} but Marlin stores bits=4, sym=True, group_size={want_group}")
        if not result.has_trivial_g_idx:
            raise QuantConfigError(f"{prefix}: act-order (a permuted g_idx) cannot be written as Marlin, which has no g_idx")
        if not bool((result.zeros == ZERO).all()):
            raise QuantConfigError(f"{prefix}: Marlin's zero point is {ZERO}; the result has others")
        check_shape(k, n, prefix)
        if k % want_group:
            raise QuantConfigError(f"{prefix}: group_size {want_group} does not divide in_features={k}")
        return {f"{prefix}.B": encode_codes(result.codes.T.contiguous()),
                f"{prefix}.s": encode_scales(result.scales.T.to(dtype).contiguous())}

    def quantization_config(self) -> dict[str, Any]:
        """What vLLM's MarlinConfig reads (group_size, lm_head) and TGI's quant_method."""
        return {"quant_method": METHOD, "bits": BITS, "group_size": self.group_size, "lm_head": False}
