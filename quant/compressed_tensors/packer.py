"""Writing compressed-tensors pack-quantized checkpoints (the inverse of quant.compressed_tensors.loader)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from kernels.packing import pack_int32
from quant.base import Packer, QuantConfigError
from quant.calibrate.args import QuantArgs, QuantResult
from quant.compressed_tensors.pack_quantized import FORMAT_VERSION, PACK_QUANTIZED, PACKED_BITS
from quant.compressed_tensors.scheme import METHOD, STATUS_COMPRESSED

logger = logging.getLogger(__name__)


class CompressedTensorsPacker(Packer):
    """Writes pack-quantized layers exactly as compressed-tensors 0.20 / llm-compressor do.

    actorder "group" (a permuted g_idx) is written the legacy way, with weight_g_idx: vLLM and
    qshard load it, compressed-tensors >= 0.20 (and so transformers with it) refuses the config.
    transformers 5.23 with compressed-tensors 0.20 loads symmetric output as is; asymmetric output,
    the package's own included, only with CompressedTensorsConfig(dequantize=True): its default
    load expects an unpacked weight_zero_point (llm-compressor issue 1618).
    """

    method = METHOD

    def __init__(self, args: QuantArgs, ignore: tuple[str, ...] | list[str] = ("lm_head",),
                 targets: tuple[str, ...] | list[str] = ("Linear",)):
        if args.bits not in PACKED_BITS:
            raise QuantConfigError(f"pack-quantized writes {'/'.join(map(str, PACKED_BITS))}-bit codes, "
                                   f"not {args.bits}")
        self.args, self.ignore, self.targets = args, list(ignore), list(targets)
        self.strategy = "channel" if args.strategy == "group" and args.group_size == -1 else args.strategy
        if args.actorder == "group":
            logger.warning("actorder 'group' is written with weight_g_idx (legacy compressed-tensors); "
                           "compressed-tensors >= 0.20 refuses such checkpoints")

    def pack(self, prefix: str, result: QuantResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        a, bits = self.args, self.args.bits
        if (result.bits, result.sym) != (bits, a.sym):
            raise QuantConfigError(f"{prefix}: result is {result.bits}-bit sym={result.sym}, the packer writes "
                                   f"{bits}-bit sym={a.sym}")
        rows, columns = result.codes.shape
        offset = 1 << (bits - 1)
        out = {"weight_packed": pack_int32(result.codes, bits, dim=1), "weight_shape": torch.tensor([rows, columns])}
        scales, zeros = result.scales, result.zeros
        if self.strategy == "tensor":
            if not (bool((scales == scales[0, 0]).all()) and bool((zeros == zeros[0, 0]).all())):
                raise QuantConfigError(f"{prefix}: strategy 'tensor' needs one scale and zero for the whole weight")
            scales, zeros = scales[:1, 0], zeros[:1, 0]
        out["weight_scale"] = torch.empty(scales.shape, dtype=dtype).copy_(scales)  # fresh, never a view
        if a.sym:
            if not bool((zeros == offset).all()):
                raise QuantConfigError(f"{prefix}: symmetric result has zero points other than {offset}")
        elif self.strategy == "tensor":
            out["weight_zero_point"] = (zeros - offset).to(torch.int8)  # signed, unpacked, as compressed-tensors
        else:
            out["weight_zero_point"] = pack_int32(zeros, bits, dim=0)
        if not result.has_trivial_g_idx:
            if a.actorder != "group":
                raise QuantConfigError(f"{prefix}: the result has a permuted g_idx but the packer's actorder is "
                                       f"{a.actorder!r}; use actorder 'group'")
            out["weight_g_idx"] = torch.empty(columns, dtype=torch.int32).copy_(result.g_idx)
        return {f"{prefix}.{k}": v for k, v in out.items()}

    def quantization_config(self) -> dict[str, Any]:
        a = self.args
        weights: dict[str, Any] = {"dynamic": False, "group_size": a.group_size if self.strategy == "group" else None,
                                   "num_bits": a.bits, "strategy": self.strategy, "symmetric": a.sym, "type": "int"}
        if a.actorder != "none":
            weights["actorder"] = a.actorder
        return {
            "config_groups": {"group_0": {"format": PACK_QUANTIZED, "input_activations": None,
                                          "output_activations": None, "targets": list(self.targets),
                                          "weights": weights}},
            "format": PACK_QUANTIZED, "global_compression_ratio": None, "ignore": list(self.ignore),
            "kv_cache_scheme": None, "moe_sparsity_config": None, "quant_method": METHOD,
            "quantization_status": STATUS_COMPRESSED, "sparsity_config": {}, "transform_config": {},
            "version": FORMAT_VERSION,
        }
