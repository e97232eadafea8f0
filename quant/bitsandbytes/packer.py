"""Writing bitsandbytes checkpoints (the inverse of quant.bitsandbytes.loader), and random
bitsandbytes weights, as transformers saves a bnb model (quant.bitsandbytes.four_bit and .loader
list the tensors).

LLM.int8 (load_in_8bit) is symmetric per-row 8-bit, w = weight * SCB / 127: a QuantResult of 8 bits,
one group per row and zero point 128 is written as weight = code - 128, SCB = 127 * scale. The
loader's SCB / 127 gives the scale back bit for bit for every float16-exact scale (the ones a
float16 export stores); of arbitrary float32 scales about 0.2% come back 1 ulp off (no float32
SCB divides back to them).
nf4 / fp4 codes index a 16-value table (quant_map) that is not evenly spaced, so no uniform-code
QuantResult (RTN, GPTQ) has an exact nf4 / fp4 form and `pack` refuses it; random nf4 / fp4 weights
(random 4-bit codes, the table, one absmax per block) are written, with plain float32 absmax
(the loader reads double-quant absmax too, but random weights do not need it) in uint8 storage.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from quant.base import Packer, QuantConfigError
from quant.bitsandbytes.config import METHOD, BnbConfig
from quant.bitsandbytes.four_bit import STATE_PREFIX
from quant.common.random_weights import RandomTensor, fixed, uniform_code_scale

BLOCKSIZE = 64  # bitsandbytes' default (transformers' BitsAndBytesConfig has no field for it)
INT8_MAX = 127.0
# bitsandbytes' code tables (functional.get_4bit_type): NF4 from the QLoRA paper; FP4 (e2m1) / 12
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)
_FP4_MAGNITUDES = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4)
FP4 = tuple(torch.tensor(_FP4_MAGNITUDES + tuple(-m if m else 0.0 for m in _FP4_MAGNITUDES)).tolist())
TABLES = {"nf4": NF4, "fp4": FP4}


def table_std(table: tuple[float, ...]) -> float:
    """The std of a table's values under uniformly random codes."""
    return torch.tensor(table, dtype=torch.float64).std(unbiased=False).item()


class BnbPacker(Packer):
    """Writes LLM.int8 layers from QuantResults; random nf4 / fp4 / LLM.int8 weights."""

    method = METHOD

    def __init__(self, bits: int = 8, quant_type: str = "nf4", blocksize: int = BLOCKSIZE,
                 skip_modules: tuple[str, ...] = ()):
        if bits not in (4, 8):
            raise QuantConfigError(f"bitsandbytes writes 4- or 8-bit weights, not bits={bits}")
        self.config = BnbConfig.parse({"load_in_4bit": bits == 4, "load_in_8bit": bits == 8,
                                       "bnb_4bit_quant_type": quant_type, "llm_int8_skip_modules": list(skip_modules)})
        if blocksize < 2 or blocksize % 2:
            raise QuantConfigError(f"bitsandbytes blocksize={blocksize} must be a positive even integer")
        self.blocksize = blocksize

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "BnbPacker":
        parsed = BnbConfig.parse(config)
        return cls(parsed.bits, parsed.quant_type if parsed.bits == 4 else "nf4", BLOCKSIZE, parsed.skip_modules)

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self.config.bits == 4:
            raise QuantConfigError(
                f"{prefix}: bitsandbytes {self.config.quant_type} cannot hold a uniform-code quantization exactly: its "
                f"4-bit codes index the {self.config.quant_type} lookup table (quant_map), whose 16 values are not "
                f"evenly spaced, while RTN/GPTQ codes are (code - zero) * scale. Write LLM.int8 (load_in_8bit, "
                f"8-bit symmetric per-row), or quantize with bitsandbytes itself")
        n, k = result.codes.shape
        if (result.bits, result.group_size) != (8, k) or result.num_groups != 1:
            raise QuantConfigError(f"{prefix}: quantized with bits={result.bits}, group_size={result.group_size} but "
                                   f"bitsandbytes LLM.int8 stores 8 bits with one scale per row (group_size={k}, "
                                   f"strategy 'channel')")
        if not bool((result.zeros == 128).all()):
            raise QuantConfigError(f"{prefix}: LLM.int8 is symmetric (zero point 128); quantize with sym=True")
        return {
            f"{prefix}.weight": (result.codes - 128).to(torch.int8).contiguous(),
            f"{prefix}.SCB": (result.scales[:, 0].float() * INT8_MAX).contiguous(),
            f"{prefix}.weight_format": torch.tensor(0, dtype=torch.uint8),
        }

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, RandomTensor]:
        """LLM.int8: random int8 codes and row scales. nf4 / fp4: random codes (two a byte), the
        table, float32 absmax giving the weight `weight_std`, and the quant_state JSON."""
        n, k = out_features, in_features
        if self.config.bits == 8:
            return {f"{prefix}.weight": RandomTensor((n, k), "codes", dtype=torch.int8),
                    f"{prefix}.SCB": RandomTensor((n,), "scales", INT8_MAX * uniform_code_scale(8, weight_std),
                                                  torch.float32),
                    f"{prefix}.weight_format": fixed(torch.tensor(0, dtype=torch.uint8))}
        qt = self.config.quant_type
        table = TABLES[qt]
        state = {"quant_type": qt, "blocksize": self.blocksize, "dtype": "float16", "shape": [n, k]}
        return {
            f"{prefix}.weight": RandomTensor((-(-n * k // 2), 1), "codes", dtype=torch.uint8),
            f"{prefix}.weight.absmax": RandomTensor((-(-n * k // self.blocksize),), "scales",
                                                    weight_std / table_std(table), torch.float32),
            f"{prefix}.weight.quant_map": fixed(torch.tensor(table, dtype=torch.float32)),
            f"{prefix}.{STATE_PREFIX}{qt}": fixed(torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)),
        }

    def quantization_config(self) -> dict[str, Any]:
        """As transformers' BitsAndBytesConfig writes it."""
        four = self.config.bits == 4
        return {"quant_method": METHOD, "_load_in_8bit": not four, "_load_in_4bit": four, "llm_int8_threshold": 6.0,
                "llm_int8_skip_modules": list(self.config.skip_modules) or None,
                "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
                "bnb_4bit_quant_type": self.config.quant_type if four else "fp4", "bnb_4bit_use_double_quant": False,
                "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8", "load_in_4bit": four,
                "load_in_8bit": not four}
