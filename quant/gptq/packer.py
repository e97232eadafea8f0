"""Writing GPTQ checkpoints (the inverse of quant.gptq.loader), and random GPTQ weights."""

from __future__ import annotations

import json
from typing import Any

import torch

from kernels.packing import pack_int32, packed_size
from quant.base import Packer, QuantConfigError
from quant.common.packed_layers import check_group_size
from quant.common.random_weights import RandomTensor, const_word, uniform_code_scale
from quant.gptq.config import GPTQParams, check_bits
from quant.gptq.zeros import FORMATS, V1, V2


class GPTQPacker(Packer):
    """Writes GPTQ layers: v2 (true zeros) for any quantization; v1 (z - 1) only when symmetric."""

    method = "gptq"

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = True, checkpoint_format: str = V1,
                 desc_act: bool | None = None, damp_percent: float = 0.01, true_sequential: bool = True):
        check_bits(bits)
        check_group_size(group_size, "gptq")
        if checkpoint_format not in FORMATS:
            raise QuantConfigError(f"checkpoint_format {checkpoint_format!r} is not one of {FORMATS}")
        if checkpoint_format == V1 and not sym:
            raise QuantConfigError("GPTQ v1 (checkpoint_format 'gptq') stores zero points as z - 1 and cannot hold the "
                             "z = 0 of asymmetric quantization (the asymmetric v1 packing bug: -1 wraps to 2^bits - 1 "
                             "and corrupts its word); write checkpoint_format 'gptq_v2' or quantize with sym=True")
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.checkpoint_format = checkpoint_format
        self.desc_act = desc_act
        self.damp_percent, self.true_sequential = damp_percent, true_sequential
        self._saw_act_order = False

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k = result.codes.shape
        want_group = k if self.group_size == -1 else self.group_size
        if (result.bits, result.sym, result.group_size) != (self.bits, self.sym, want_group):
            raise QuantConfigError(f"{prefix}: quantized with bits={result.bits}, sym={result.sym}, group_size="
                             f"{result.group_size} but the packer writes bits={self.bits}, sym={self.sym}, "
                             f"group_size={want_group}")
        zeros = result.zeros.T.contiguous()  # [G, N] true zero points
        if self.checkpoint_format == V1:
            if bool((zeros < 1).any()):
                raise QuantConfigError(f"{prefix}: a zero point of 0 cannot be written as GPTQ v1 (z - 1 = -1)")
            zeros = zeros - 1
        self._saw_act_order |= not result.has_trivial_g_idx
        return {
            f"{prefix}.qweight": pack_int32(result.codes.T, self.bits, 0),
            f"{prefix}.qzeros": pack_int32(zeros, self.bits, 1),
            f"{prefix}.scales": result.scales.T.to(dtype).contiguous(),
            f"{prefix}.g_idx": result.g_idx.to(torch.int32).contiguous(),
        }

    def _desc_act(self) -> bool:
        return self._saw_act_order if self.desc_act is None else self.desc_act

    def quantization_config(self) -> dict[str, Any]:
        """As transformers' GPTQConfig writes it (format and its legacy name checkpoint_format)."""
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "damp_percent": self.damp_percent, "desc_act": self._desc_act(), "sym": self.sym,
                "true_sequential": self.true_sequential, "format": self.checkpoint_format,
                "checkpoint_format": self.checkpoint_format, "meta": {"quantizer": ["qshard"]}}

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "GPTQPacker":
        p = GPTQParams.parse(config)
        return cls(p.bits or 4, 128 if p.group_size is None else p.group_size, p.sym is not False,
                   p.checkpoint_format or V1, p.desc_act)

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, RandomTensor]:
        """Uniform random codes, the symmetric zero point (v1 stores z - 1), small fp16 scales and
        the trivial g_idx."""
        bits, n, k = self.bits, out_features, in_features
        if bits not in (2, 4, 8):
            raise QuantConfigError(f"random gptq weights are 2/4/8-bit, not bits={bits}")
        g = k if self.group_size == -1 else self.group_size
        groups = -(-k // g)
        z = (1 << (bits - 1)) - (0 if self.checkpoint_format == V2 else 1)
        return {
            f"{prefix}.qweight": RandomTensor((packed_size(k, bits), n), "codes", dtype=torch.int32),
            f"{prefix}.qzeros": RandomTensor((groups, packed_size(n, bits)), "const", const_word(z, bits), torch.int32),
            f"{prefix}.scales": RandomTensor((groups, n), "scales", uniform_code_scale(bits, weight_std), torch.float16),
            f"{prefix}.g_idx": RandomTensor((k,), "group_ids", g, torch.int32),
        }

    def extra_files(self) -> list[tuple[str, str]]:
        """quantize_config.json as AutoGPTQ / GPTQModel write it beside config.json."""
        config = {"bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
                  "desc_act": self._desc_act(), "static_groups": False, "sym": self.sym,
                  "true_sequential": self.true_sequential, "model_name_or_path": None, "model_file_base_name": None,
                  "quant_method": "gptq", "checkpoint_format": self.checkpoint_format}
        return [("quantize_config.json", json.dumps(config, indent=2))]
