"""Writes AQLM layers (the inverse of quant.aqlm.loader) from `AqlmCodes`: codes stored signed in
int8 / int16 as AQLM's pack_int_data does, codebooks and scales in the checkpoint dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quant.aqlm.config import AqlmParams
from quant.base import Packer, QuantConfigError
from quant.common.random_weights import RandomTensor


@dataclass
class AqlmCodes:
    """One layer in AQLM's terms: unsigned codes, codebooks, per-out-group scales."""

    codes: torch.Tensor  # int64 [N/og, K/ig, C], values in [0, 2^b)
    codebooks: torch.Tensor  # float [C, 2^b, og, ig]
    scales: torch.Tensor  # float [N/og]

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """W [N, K] float32 as decoded from codebooks and scales stored in `dtype` (AQLM's formula:
        sum of the codebooks' vectors, times the out-group's scale)."""
        books, scales = self.codebooks.to(dtype).float(), self.scales.to(dtype).float()
        no, ki, c = self.codes.shape
        og, ig = books.shape[2:]
        w = books[0][self.codes[..., 0]]
        for i in range(1, c):
            w = w + books[i][self.codes[..., i]]
        w = w * scales[:, None, None, None]
        return w.permute(0, 2, 1, 3).reshape(no * og, ki * ig)


def signed_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """AQLM's storage: values >= 2^(b-1) wrap to negative, int8 up to 8 bits, int16 above."""
    codes = codes.to(torch.int64)
    codes = torch.where(codes >= 1 << (nbits - 1), codes - (1 << nbits), codes)
    return codes.to(torch.int8 if nbits <= 8 else torch.int16)


class AqlmPacker(Packer):
    method = "aqlm"

    def __init__(self, num_codebooks: int = 2, nbits_per_codebook: int = 8, in_group_size: int = 8,
                 out_group_size: int = 1, not_quantized: tuple[str, ...] = ("lm_head.weight",)):
        self.params = AqlmParams.parse({"num_codebooks": num_codebooks, "nbits_per_codebook": nbits_per_codebook,
                                        "in_group_size": in_group_size, "out_group_size": out_group_size,
                                        "linear_weights_not_to_quantize": list(not_quantized)})

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "AqlmPacker":
        p = AqlmParams.parse(config)
        return cls(p.num_codebooks, p.nbits_per_codebook, p.in_group_size, p.out_group_size, p.not_quantized)

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, RandomTensor]:
        """Uniform random codes (int32 words: every value mod 2^b is uniform), codebooks uniform in
        [-v, v] with v = std * sqrt(3 / C) (a sum of C such entries has std `weight_std`), scales 1."""
        p = self.params
        og, ig, C = p.out_group_size, p.in_group_size, p.num_codebooks
        if out_features % og or in_features % ig:
            raise QuantConfigError(f"{prefix}: [{out_features}, {in_features}] is not whole {og}x{ig} aqlm cells")
        return {f"{prefix}.codes": RandomTensor((out_features // og, in_features // ig, C), "codes", dtype=torch.int32),
                f"{prefix}.codebooks": RandomTensor((C, p.codebook_size, og, ig), "uniform",
                                                    weight_std * (3 / C) ** 0.5, torch.float16),
                f"{prefix}.scales": RandomTensor((out_features // og, 1, 1, 1), "ones", dtype=torch.float16)}

    def pack(self, prefix: str, result: AqlmCodes, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        p = self.params
        want = (p.num_codebooks, p.codebook_size, p.out_group_size, p.in_group_size)
        if tuple(result.codebooks.shape) != want or result.codes.shape[2] != p.num_codebooks:
            raise QuantConfigError(f"{prefix}: codebooks {list(result.codebooks.shape)} / codes "
                                   f"{list(result.codes.shape)} do not match the packer's {list(want)}")
        if int(result.codes.min()) < 0 or int(result.codes.max()) >= p.codebook_size:
            raise QuantConfigError(f"{prefix}: codes outside [0, {p.codebook_size})")
        return {f"{prefix}.codes": signed_codes(result.codes, p.nbits_per_codebook).contiguous(),
                f"{prefix}.codebooks": result.codebooks.to(dtype).contiguous(),
                f"{prefix}.scales": result.scales.to(dtype).reshape(-1, 1, 1, 1).contiguous()}

    def quantization_config(self) -> dict[str, Any]:
        return self.params.to_config()
