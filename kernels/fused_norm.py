"""RMSNorm fused with the residual add, in Triton: one launch per norm.

With a residual: residual += x in place (the sum rounded to the residual's dtype, as `h = h + x`
rounds it), then the norm of the new residual. The normalised value is rounded to the output
dtype before the weight scales it, as the torch path does (engine/layers/norm.py), so that both
agree to rounding in float32 and float16.
"""

from __future__ import annotations

import torch

_COMPILED = None


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(X, R, W, O, stride_x, stride_r, stride_o, N, eps,
                            HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        w = tl.load(W + cols, mask=mask, other=0.0)  # issued with x: its latency (DRAM, not L2) overlaps
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(R.dtype.element_ty)
            tl.store(R + row * stride_r + cols, x, mask=mask)
        h = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)  # as torch.rsqrt
        y = (h * rstd).to(O.dtype.element_ty)
        tl.store(O + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(O.dtype.element_ty), mask=mask)

    return add_rms_norm_kernel


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 num_warps: int | None = None) -> torch.Tensor:
    """x [T, N] (and residual [T, N], updated in place to residual + x) → RMSNorm of the sum [T, N].
    One program per row; num_warps defaults to one per 256 columns (16 at most)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    T, N = x.shape
    if x.stride(-1) != 1 or (residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1)):
        raise ValueError(f"add_rms_norm needs row-contiguous x and residual of one shape, got x {tuple(x.shape)} "
                         f"residual {None if residual is None else tuple(residual.shape)}")
    out = torch.empty(T, N, dtype=weight.dtype, device=x.device)
    if T == 0:
        return out
    block = 1 << (N - 1).bit_length()
    r = residual if residual is not None else x
    _COMPILED[(T,)](x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), N, eps,
                    HAS_RESIDUAL=residual is not None, BLOCK=block,
                    num_warps=num_warps or min(16, max(1, block // 256)))
    return out
