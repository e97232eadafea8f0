"""Quantization parameters and round-to-nearest (RTN), shared by GPTQ so both agree bit for bit.

Min-max parameters, per group of columns of each output row (one pair per tensor for "tensor"),
with the range widened to include 0 so that 0 is exactly representable:
    lo = min(min(w), 0), hi = max(max(w), 0), max_code = 2^bits - 1
    symmetric:  scale = max(-lo, hi) / (max_code / 2),  zero = 2^(bits-1)
    asymmetric: scale = (hi - lo) / max_code,           zero = clamp(round(-lo / scale), 0, max_code)
    a scale of 0 (all-zero group) becomes 1.
    code = clamp(round(w / scale) + zero, 0, max_code)
The symmetric scale equals llm-compressor's (absmax / (bit_range / 2)) and original GPTQ's
(2 * absmax / max_code); its signed code range [-2^(bits-1), 2^(bits-1) - 1] is ours shifted by
zero = 2^(bits-1), so +absmax rounds to 2^(bits-1) and is clipped to max_code, as there.
llm-compressor clamps scales below float32 eps up to eps; we only replace exact zeros.
"""

from __future__ import annotations

import torch

from quant.calibrate.args import QuantArgs, QuantResult


def compute_qparams(weight: torch.Tensor, args: QuantArgs, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (float32 [N, G]) and true zero points (int32 [N, G]) of a float32 weight [N, K]."""
    rows, columns = weight.shape
    if args.strategy == "tensor":
        lo, hi = weight.amin().reshape(1, 1), weight.amax().reshape(1, 1)
    else:
        grouped = weight.reshape(rows, columns // group_size, group_size)
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if args.sym:
        scales = torch.maximum(-lo, hi) / (args.max_code / 2)
    else:
        scales = (hi - lo) / args.max_code
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    if args.sym:
        zeros = torch.full_like(scales, args.sym_zero)
    else:
        zeros = torch.round(-lo / scales).clamp(0, args.max_code)
    return scales.expand(rows, -1).contiguous(), zeros.expand(rows, -1).to(torch.int32).contiguous()


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int) -> torch.Tensor:
    """Unsigned codes, as float (exact small integers), of `w` under broadcastable scale/zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code)


def trivial_g_idx(columns: int, group_size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(columns, device=device, dtype=torch.int32) // group_size


def rtn_quantize(weight: torch.Tensor, args: QuantArgs) -> QuantResult:
    """Round-to-nearest baseline. loss = 0.5 * ||W - Q||^2 (GPTQ's loss with an identity Hessian)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    rows, columns = w.shape
    group_size = args.columns_per_group(columns)
    scales, zeros = compute_qparams(w, args, group_size)
    g_idx = trivial_g_idx(columns, group_size, w.device)

    grouped = w.reshape(rows, -1, group_size)
    group_scales, group_zeros = scales.unsqueeze(-1), zeros.unsqueeze(-1).float()
    codes = quantize_to_codes(grouped, group_scales, group_zeros, args.max_code)
    dequantized = (codes - group_zeros) * group_scales
    loss = 0.5 * float(((grouped - dequantized) ** 2).sum())
    return QuantResult(codes=codes.reshape(rows, columns).to(torch.int32), scales=scales, zeros=zeros,
                       g_idx=g_idx, group_size=group_size, bits=args.bits, sym=args.sym, loss=loss)
