"""Writing torchao layers (the inverse of quant.torchao.loader), and random torchao weights: the
`{module}._weight_{attr}` tensors transformers' TorchAoConfig saves (quant.torchao.config lists them).

- Int4Tensor (plain): qdata int8 [N, K/2] (column 2j in the low nibble, signed q = u - 8), scale and
  zero_point [K/g, N] in the checkpoint dtype, w = q * scale + zero_point. A QuantResult's
  (u - z) * s is q * s + (8 - z) * s: exact where the zero point (8 - z) * s is exact in the stored
  dtype (always in float32; in bfloat16 / float16 it is rounded to that dtype).
- Int8Tensor: qdata int8 = u - 128, zero_point int8 = z - 128, scale float32 [N, G] (per row, or
  per group of the config), w = (q - zero_point) * scale = (u - z) * s exactly.
Float8Tensor and the tinygemm tile-packed int4 layout are read, not written. Only tensor data is
written: the safetensors header metadata torchao's own loader also wants (its `_type` /
`_tensor_data_names` per weight) is not, since quant.export writes no per-tensor metadata.
"""

from __future__ import annotations

from typing import Any

import torch

from quant.base import Packer, QuantConfigError
from quant.common.random_weights import RandomTensor, uniform_code_scale
from quant.torchao.config import INT4_PLAIN, INT8, METHOD, TorchaoConfig

WRITTEN = (INT4_PLAIN, INT8)


def _config(kind: str, group_size: int | None) -> dict[str, Any]:
    """quant_type.default as torchao's config_to_dict writes it (version 2)."""
    if kind == INT4_PLAIN:
        data = {"group_size": group_size, "set_inductor_config": True, "int4_packing_format": "plain",
                "int4_choose_qparams_algorithm": {"_type": "Int4ChooseQParamsAlgorithm", "_data": "TINYGEMM"},
                "int4_tile_packed_ntile": 8}
        return {"_type": "Int4WeightOnlyConfig", "_version": 2, "_data": data}
    granularity = ({"_type": "PerRow", "_version": 1, "_data": {"dim": -1}} if group_size is None
                   else {"_type": "PerGroup", "_version": 1, "_data": {"group_size": group_size}})
    return {"_type": "Int8WeightOnlyConfig", "_version": 2,
            "_data": {"group_size": None, "granularity": granularity, "set_inductor_config": True}}


class TorchaoPacker(Packer):
    method = METHOD

    def __init__(self, kind: str = INT4_PLAIN, group_size: int | None = 128, ignored: tuple[str, ...] = ()):
        if kind not in WRITTEN:
            raise QuantConfigError(f"torchao {kind} is read but not written; qshard writes {', '.join(WRITTEN)}")
        if kind == INT4_PLAIN and (group_size is None or group_size < 1):
            raise QuantConfigError(f"torchao int4 needs a positive group_size, got {group_size!r}")
        self.kind, self.group_size, self.ignored = kind, group_size, tuple(ignored)

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> "TorchaoPacker":
        parsed = TorchaoConfig.parse(config)
        return cls(parsed.kind, parsed.group_size, parsed.ignored)

    def _group(self, prefix: str, k: int) -> int:
        gs = k if self.group_size is None else self.group_size
        if k % gs or (self.kind == INT4_PLAIN and k % 2):
            raise QuantConfigError(f"{prefix}: torchao {self.kind} group_size={gs} does not divide in_features={k}"
                                   f"{' (or it is odd: two codes a byte)' if self.kind == INT4_PLAIN else ''}")
        return gs

    def pack(self, prefix: str, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k = result.codes.shape
        gs = self._group(prefix, k)
        bits = 4 if self.kind == INT4_PLAIN else 8
        if (result.bits, result.group_size) != (bits, gs):
            raise QuantConfigError(f"{prefix}: quantized with bits={result.bits}, group_size={result.group_size} but "
                                   f"torchao {self.kind} stores bits={bits}, group_size={gs}")
        if not result.has_trivial_g_idx:
            raise QuantConfigError(f"{prefix}: act-order (a permuted g_idx) cannot be written as torchao, which has "
                                   f"no g_idx")
        if self.kind == INT8:
            return {f"{prefix}._weight_qdata": (result.codes - 128).to(torch.int8).contiguous(),
                    f"{prefix}._weight_scale": result.scales.float().contiguous(),
                    f"{prefix}._weight_zero_point": (result.zeros - 128).to(torch.int8).contiguous()}
        q = result.codes.to(torch.int32) - 8  # signed, [-8, 7]
        packed = ((q[:, 1::2] << 4) | (q[:, ::2] & 15)).to(torch.int8)
        scales = result.scales.float()
        zero = (8 - result.zeros).float() * scales
        return {f"{prefix}._weight_qdata": packed.contiguous(),
                f"{prefix}._weight_scale": scales.T.to(dtype).contiguous(),
                f"{prefix}._weight_zero_point": zero.T.to(dtype).contiguous()}

    def random_tensors(self, prefix: str, out_features: int, in_features: int,
                       weight_std: float) -> dict[str, RandomTensor]:
        """Random codes (every bit of qdata), zero points 0 and scales giving `weight_std`."""
        n, k = out_features, in_features
        gs = self._group(prefix, k)
        groups = k // gs
        if self.kind == INT8:
            return {f"{prefix}._weight_qdata": RandomTensor((n, k), "codes", dtype=torch.int8),
                    f"{prefix}._weight_scale": RandomTensor((n, groups), "scales", uniform_code_scale(8, weight_std),
                                                            torch.float32),
                    f"{prefix}._weight_zero_point": RandomTensor((n, groups), "const", 0, torch.int8)}
        return {f"{prefix}._weight_qdata": RandomTensor((n, k // 2), "codes", dtype=torch.int8),
                f"{prefix}._weight_scale": RandomTensor((groups, n), "scales", uniform_code_scale(4, weight_std),
                                                        torch.bfloat16),
                f"{prefix}._weight_zero_point": RandomTensor((groups, n), "const", 0, torch.bfloat16)}

    def quantization_config(self) -> dict[str, Any]:
        """As transformers' TorchAoConfig writes it."""
        return {"quant_method": METHOD, "quant_type": {"default": _config(self.kind, self.group_size)},
                "modules_to_not_convert": list(self.ignored) or None, "include_input_output_embeddings": False,
                "untie_embedding_weights": False}
