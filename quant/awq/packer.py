"""Writing AWQ GEMM checkpoints (the inverse of quant.awq.loader), and random AWQ weights."""

from __future__ import annotations

from typing import Any

import torch

from kernels.packing import AWQ_ORDER, pack_int32, packed_size
from quant.awq.loader import BITS, AWQLoader
from quant.base import Packer, QuantConfigError
from quant.common.packed_layers import check_group_size
from quant.common.random_weights import RandomTensor, const_word, uniform_code_scale


class AWQPacker(Packer):
    """Writes AWQ GEMM layers (4 bits, stored zero points) from trivially ordered groups."""

    method = "awq"

    def __init__(self, group_size: int = 128):
        check_group_size(group_size, "awq")
        self.group_size = group_size

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k = result.codes.shape
        want_group = k if self.group_size == -1 else self.group_size
        if (result.bits, result.group_size) != (BITS, want_group):
            raise QuantConfigError(f"{prefix}: quantized with bits={result.bits}, group_size={result.group_size} but AWQ "
                             f"stores bits=4, group_size={want_group}")
        if not result.has_trivial_g_idx:
            raise QuantConfigError(f"{prefix}: act-order (a permuted g_idx) cannot be written as AWQ, which has no g_idx")
        return {
            f"{prefix}.qweight": pack_int32(result.codes.T, BITS, 1, AWQ_ORDER),
            f"{prefix}.qzeros": pack_int32(result.zeros.T, BITS, 1, AWQ_ORDER),
            f"{prefix}.scales": result.scales.T.to(dtype).contiguous(),
        }

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "AWQPacker":
        return cls(AWQLoader.from_config(config).group_size)

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, RandomTensor]:
        """Uniform random codes, the mid-range zero point 8 and small fp16 scales."""
        n, k = out_features, in_features
        groups = -(-k // (k if self.group_size == -1 else self.group_size))
        return {
            f"{prefix}.qweight": RandomTensor((k, packed_size(n, BITS)), "codes", dtype=torch.int32),
            f"{prefix}.qzeros": RandomTensor((groups, packed_size(n, BITS)), "const", const_word(8, BITS), torch.int32),
            f"{prefix}.scales": RandomTensor((groups, n), "scales", uniform_code_scale(BITS, weight_std), torch.float16),
        }

    def quantization_config(self) -> dict[str, Any]:
        """As AutoAWQ writes it into config.json."""
        return {"quant_method": "awq", "bits": BITS, "group_size": self.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
