"""Writing HQQ checkpoints (the inverse of quant.hqq.loader): a layer's integer codes and zero
points (e.g. RTN from quant.calibrate) in hqq's packing, with the bookkeeping tensors HQQLinear's
state dict carries, so that hqq itself (HQQLinear.load_state_dict) and transformers read them;
and random hqq weights (random codes in every field, mid-range zeros, small scales, the same
bookkeeping tensors)."""

from __future__ import annotations

from typing import Any

import torch

from quant.base import Packer, QuantConfigError
from quant.common.random_weights import RandomTensor, fixed, uniform_code_scale
from quant.hqq.config import METHOD, HqqConfig
from quant.hqq.packing import PACKING_OF_BITS, PACKINGS, PackedCodes

COMPUTE_DTYPE = torch.float16


def _text(s: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in s], dtype=torch.uint8)


def _flag(b: bool) -> torch.Tensor:
    return torch.tensor(int(b), dtype=torch.uint8)


def pack_codes(codes: torch.Tensor, packing: str) -> torch.Tensor:
    """codes int [G, gs] -> W_q: chunk j of the rows into field j (quant.hqq.packing)."""
    fields, bits, word = PACKINGS[packing]
    step = -(-codes.shape[0] // fields)
    padded = torch.zeros(fields * step, codes.shape[1], dtype=torch.int64)
    padded[: codes.shape[0]] = codes
    out = torch.zeros(step, codes.shape[1], dtype=torch.int64)
    for j in range(fields):
        shift = 27 - 3 * j if packing == "3bit_32" else 8 - bits * (j + 1)
        out |= padded[j * step:(j + 1) * step] << shift
    return out.to(word)


class HqqPacker(Packer):
    method = METHOD

    def __init__(self, bits: int = 4, group_size: int = 64):
        if bits not in PACKING_OF_BITS:
            raise QuantConfigError(f"hqq writes {', '.join(map(str, sorted(PACKING_OF_BITS)))}-bit codes, not {bits}")
        if group_size < 1:
            raise QuantConfigError(f"hqq group_size={group_size} must be positive")
        self.bits, self.group_size = bits, group_size

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "HqqPacker":
        parsed = HqqConfig.parse(config)
        if parsed.default is None or parsed.default.group_size is None:
            raise QuantConfigError("the hqq packer writes one nbits / group_size for every layer")
        return cls(parsed.default.nbits, parsed.default.group_size)

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k = result.codes.shape
        if (result.bits, result.group_size) != (self.bits, self.group_size):
            raise QuantConfigError(f"{prefix}: quantized with bits={result.bits}, group_size={result.group_size} but "
                                   f"the hqq packer writes bits={self.bits}, group_size={self.group_size}")
        if not result.has_trivial_g_idx:
            raise QuantConfigError(f"{prefix}: act-order (a permuted g_idx) cannot be written as hqq")
        if k % self.group_size:
            raise QuantConfigError(f"{prefix}: group_size={self.group_size} does not divide in_features={k}")
        packing = PACKING_OF_BITS[self.bits]
        groups = PackedCodes(packing, n * k // self.group_size, self.group_size)
        meta = {
            "W_q": pack_codes(result.codes.reshape(groups.groups, self.group_size), packing),
            "scale": result.scales.reshape(-1, 1).to(COMPUTE_DTYPE), "zero": result.zeros.reshape(-1, 1).to(COMPUTE_DTYPE),
            **self.bookkeeping(n, k),
        }
        return {f"{prefix}.{key}": value for key, value in meta.items()}

    def bookkeeping(self, n: int, k: int) -> dict[str, torch.Tensor]:
        """The tensors HQQLinear's state dict carries beside W_q / scale / zero."""
        packing = PACKING_OF_BITS[self.bits]
        return {
            "shape": torch.tensor([n, k]), "nbits": torch.tensor(self.bits, dtype=torch.int32),
            "group_size": torch.tensor(self.group_size, dtype=torch.int32), "axis": torch.tensor(1, dtype=torch.int32),
            "packing": _text(packing), "unpack_view_dtype": _text(str(PACKINGS[packing][2])),
            "compute_dtype": _text(str(COMPUTE_DTYPE)), "view_as_float": _flag(False), "quant_scale": _flag(False),
            "quant_zero": _flag(False), "offload_meta": _flag(False), "encoded_state_dict": _flag(True),
            "stores_quant_config": _flag(True), "channel_wise": _flag(True), "optimize": _flag(False),
            "round_zero": _flag(False),
        }

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, RandomTensor]:
        """Every field of W_q random (uniform codes), the mid-range zero 2^(b-1), float16 scales
        giving `weight_std`. 5- and 6-bit codes sit in 8-bit fields, where a random byte is no code."""
        n, k = out_features, in_features
        if self.bits in (5, 6):
            raise QuantConfigError(f"random hqq weights are 1/2/3/4/8-bit: {self.bits}-bit codes are stored in 8-bit "
                                   f"fields, where most random bytes are not {self.bits}-bit codes")
        if k % self.group_size:
            raise QuantConfigError(f"{prefix}: hqq group_size={self.group_size} does not divide in_features={k}")
        packing = PACKING_OF_BITS[self.bits]
        codes = PackedCodes(packing, n * k // self.group_size, self.group_size)
        codes.check_exact(f"{prefix}.W_q")
        word = PACKINGS[packing][2]
        groups = (codes.groups, 1)
        tensors = {"W_q": RandomTensor(tuple(codes.stored_shape(word)), "codes", dtype=word),
                   "scale": RandomTensor(groups, "scales", uniform_code_scale(self.bits, weight_std), COMPUTE_DTYPE),
                   "zero": RandomTensor(groups, "const", 1 << (self.bits - 1), COMPUTE_DTYPE)}
        tensors.update({key: fixed(t) for key, t in self.bookkeeping(n, k).items()})
        return {f"{prefix}.{key}": value for key, value in tensors.items()}

    def quantization_config(self) -> dict[str, Any]:
        """As transformers' HqqConfig writes it."""
        return {"quant_method": METHOD, "skip_modules": ["lm_head"],
                "quant_config": {"weight_quant_params": {"nbits": self.bits, "channel_wise": True,
                                                         "group_size": self.group_size, "optimize": False,
                                                         "round_zero": False, "axis": 1, "view_as_float": False},
                                 "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}}
