"""GPTQ (Frantar et al., 2022, arXiv:2210.17323) for one linear layer, in plain torch.

Follows llm-compressor's `quantize_weight`: quantization parameters are computed up front
(rtn.compute_qparams) from the weight, in original or act-order group order; columns are then
quantized one by one, each column's rounding error is spread over the columns not yet quantized
through the upper Cholesky factor of H^-1, lazily per block of `blocksize` columns.
Where we differ from it, deliberately: dead input columns are zeroed BEFORE the parameters are
computed (their weight is dropped anyway, so it should not widen the range); act order also
applies to the "channel"/"tensor" strategies; codes are recorded as they are chosen instead of
being re-derived from the fake-quantized weight.
"""

from __future__ import annotations

import logging

import torch

from quant.calibrate.args import QuantArgs, QuantResult
from quant.calibrate.rtn import compute_qparams, quantize_to_codes, rtn_quantize, trivial_g_idx

logger = logging.getLogger(__name__)

# llm-compressor's threshold: from 5% exact zeros on, the weight is taken as pruned and error
# updates are masked so that pruned weights stay exactly zero.
SPARSITY_THRESHOLD = 0.05


class _HessianNotInvertible(Exception):
    pass


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, blocksize: int = 128,
                  percdamp: float = 0.01, *, name: str | None = None,
                  preserve_zeros: bool | None = None) -> QuantResult:
    """Quantize `weight` [N, K] (nn.Linear layout) given its input Hessian [K, K].

    percdamp: fraction of the mean Hessian diagonal added to the diagonal before inversion.
    name: the layer's name, for the warning logged when falling back to round-to-nearest.
    preserve_zeros: keep exact-zero weights at zero; None = when >= SPARSITY_THRESHOLD are zero.
    Works on the weight's device, in float32. Result: see QuantResult (codes, true zero points).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"hessian must be [{columns}, {columns}] for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    group_size = args.columns_per_group(columns)
    layer = name or "<unnamed layer>"

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    if not torch.isfinite(h).all():
        return _fall_back_to_rtn(weight, args, layer, "it has non-finite entries", percdamp)
    if preserve_zeros is None:
        preserve_zeros = bool((w == 0).float().mean() >= SPARSITY_THRESHOLD)

    # An input that was always zero carries no information: pin its diagonal so H stays
    # invertible and drop its weight column (it never contributes to the calibrated output).
    input_importance = torch.diagonal(h).clone()
    dead = (input_importance == 0).nonzero().squeeze(1)
    h[dead, dead] = 1
    w[:, dead] = 0

    perm = None
    if args.actorder != "none":
        # Most important inputs first; stable so ties keep their order (dead columns go last).
        perm = torch.argsort(input_importance, descending=True, stable=True)
    processing_groups = trivial_g_idx(columns, group_size, w.device)
    if args.actorder == "group":
        w, h = w[:, perm], h[perm][:, perm]
        scales, zeros = compute_qparams(w, args, group_size)  # groups of consecutive act-order columns
    else:
        scales, zeros = compute_qparams(w, args, group_size)  # groups in original column order
        if perm is not None:
            w, h = w[:, perm], h[perm][:, perm]
            processing_groups = processing_groups[perm]
    nonzero_mask = (w != 0).to(torch.float32) if preserve_zeros else None

    try:
        hinv_upper = _inverse_hessian_upper_cholesky(h, percdamp)
    except _HessianNotInvertible as failure:
        return _fall_back_to_rtn(weight, args, layer, str(failure), percdamp)

    codes, losses = _quantize_columns(w, hinv_upper, scales, zeros, processing_groups, args.max_code,
                                      blocksize, nonzero_mask)
    g_idx = trivial_g_idx(columns, group_size, w.device)
    if perm is not None:
        original_order = torch.argsort(perm)
        codes = codes[:, original_order]
        if args.actorder == "group":
            g_idx = g_idx[original_order]  # column k sat at position original_order[k]
    return QuantResult(codes=codes.to(torch.int32), scales=scales, zeros=zeros, g_idx=g_idx,
                       group_size=group_size, bits=args.bits, sym=args.sym, loss=float(losses.sum()))


def _inverse_hessian_upper_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U with H^-1 = U^T U, H dampened by percdamp * mean(diag H). H is modified in place."""
    h.diagonal().add_(percdamp * torch.mean(torch.diagonal(h)))
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise _HessianNotInvertible(f"it is not positive definite (Cholesky failed at column {int(info)})")
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        raise _HessianNotInvertible("its inverse is numerically singular")
    return upper


def _quantize_columns(w: torch.Tensor, hinv_upper: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      processing_groups: torch.Tensor, max_code: int, blocksize: int,
                      nonzero_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ column loop over w (modified in place). Returns float codes [N, K] and per-row losses."""
    rows, columns = w.shape
    codes = torch.empty_like(w)
    losses = torch.zeros(rows, dtype=torch.float32, device=w.device)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = w[:, start:end].clone()
        block_hinv = hinv_upper[start:end, start:end]
        groups = processing_groups[start:end].long()
        block_scales, block_zeros = scales[:, groups], zeros[:, groups].to(torch.float32)
        block_codes = torch.empty_like(block)
        block_errors = torch.empty_like(block)
        block_mask = None if nonzero_mask is None else nonzero_mask[:, start:end]

        for i in range(end - start):
            column, scale, zero = block[:, i], block_scales[:, i], block_zeros[:, i]
            code = quantize_to_codes(column, scale, zero, max_code)
            # Same expression as QuantResult.dequantize, so the propagated error is the real one.
            dequantized = (code - zero) * scale
            error = (column - dequantized) / block_hinv[i, i]
            update = torch.outer(error, block_hinv[i, i + 1:])
            if block_mask is not None:
                update *= block_mask[:, i + 1:]
            block[:, i + 1:] -= update
            block_codes[:, i] = code
            block_errors[:, i] = error

        codes[:, start:end] = block_codes
        losses += (block_errors ** 2).sum(dim=1) / 2
        update = block_errors @ hinv_upper[start:end, end:]
        if nonzero_mask is not None:
            update *= nonzero_mask[:, end:]
        w[:, end:] -= update
    return codes, losses


def _fall_back_to_rtn(weight: torch.Tensor, args: QuantArgs, layer: str, reason: str,
                      percdamp: float) -> QuantResult:
    logger.warning("GPTQ could not invert the Hessian of layer %s (%s); falling back to round-to-nearest "
                   "for it. Raise percdamp (now %g), use more calibration samples, or shuffle them.",
                   layer, reason, percdamp)
    return rtn_quantize(weight, args)
