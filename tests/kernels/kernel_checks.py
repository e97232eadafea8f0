"""The accuracy check every kernel test uses: a float64 GEMM on the dequantized weight is the truth."""

from __future__ import annotations

import torch

from kernels import reference
from kernels.layouts import AWQLayout, GPTQLayout

# unit roundoff of each activation dtype (outputs are rounded to it; the interpreter truncates: 2u)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


def weight_magnitude(layout) -> torch.Tensor:
    """[N, K] float64 bound on every term a backend may add for one weight element.

    |w| for int8/FP8; for GPTQ/AWQ |w| + 2**bits * s, because backends may split (q - z) s into
    pieces up to that size (e.g. (q - 8) s + (8 - z) s), each rounded on its own.
    """
    w = reference.dequantize(layout, torch.float64).abs()
    if isinstance(layout, GPTQLayout):
        s = layout.scales.double()[reference.gptq_group_ids(layout)]
    elif isinstance(layout, AWQLayout):
        s = layout.scales.double()[torch.arange(layout.in_features, device=w.device) // layout.group_size]
    else:
        return w
    return w + 2.0 ** layout.bits * s.T


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, layout, *, rel: float = 4.0) -> None:
    """y ≈ x @ W^T elementwise within rel·u·(|x| @ mag^T) and normwise within rel·u (u: y's unit roundoff)."""
    assert torch.isfinite(y).all(), f"{int((~torch.isfinite(y)).sum())} of {y.numel()} outputs not written / not finite"
    # output rounding, or fp32 accumulation over K terms (worst case K·2**-24) when that is larger
    u = max(UNIT_ROUNDOFF[y.dtype], x.shape[-1] * 2.0 ** -24)
    ref = reference.reference_matmul(x, layout)
    err = (y.double() - ref).abs()
    bound = rel * u * (x.double().abs() @ weight_magnitude(layout).T) + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"max error {err.max().item():.3e} is {worst:.2f}x the elementwise bound"
    normwise = (err.norm() / ref.norm()).item()
    assert normwise <= rel * u, f"normwise relative error {normwise:.3e} > {rel * u:.3e}"


def bf16_cpu_backend(layout, without_amx: str) -> str:
    """The backend `prepare(layout, bf16)` picks on this CPU: the AMX kernel where it runs, else `without_amx`."""
    from kernels import cpu_amx

    return "cpu-amx" if cpu_amx.unsupported_reason(layout, torch.bfloat16) is None else without_amx
