"""Checkpoints written by the compressed-tensors package itself, as llm-compressor saves them."""

from __future__ import annotations

from pathlib import Path

import torch


def package_checkpoint(float_dir: Path, out: Path, weights_args: dict, fmt: str = "pack-quantized",
                       input_args: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """What llm-compressor does at save time: min-max weight qparams through the package's
    calculate_qparams, then its ModelCompressor writes `fmt` and config.json's quantization_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=dtype)
    args = QuantizationArgs(**weights_args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args,
                                input_activations=QuantizationArgs(**input_args) if input_args else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for _, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        w = module.weight.detach().float()
        if args.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        else:
            size = w.shape[1] if args.strategy == "channel" else args.group_size
            grouped = w.reshape(w.shape[0], -1, size)
            lo, hi = grouped.amin(-1), grouped.amax(-1)
        scale, zero = calculate_qparams(lo, hi, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):  # symmetric float schemes have none
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return out
