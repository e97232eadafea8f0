"""SiLU(gate) * up in one Triton launch, reading the merged gate_up projection's output.

Each row of the input is [gate | up] (MergedColumnParallelLinear's order). SiLU is rounded to
the dtype before the product, as `F.silu(gate) * up` rounds it.
"""

from __future__ import annotations

import torch

_COMPILED = None
BLOCK = 1024


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def silu_mul_kernel(X, O, stride_x, stride_o, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(O + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(O.dtype.element_ty), mask=mask)

    return silu_mul_kernel


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2N] = [gate | up] → silu(gate) * up [T, N]."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernel()
    T, two_n = x.shape
    if two_n % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_mul needs a row-contiguous [T, 2N] input, got {tuple(x.shape)}")
    n = two_n // 2
    out = torch.empty(T, n, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    _COMPILED[(T, -(-n // BLOCK))](x, out, x.stride(0), out.stride(0), n, BLOCK=BLOCK, num_warps=4)
    return out
