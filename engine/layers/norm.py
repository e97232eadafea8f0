"""RMSNorm, computed in float32 and scaled in the model's dtype (as the reference does), fused
with the residual add that precedes it in a pre-norm block."""

from __future__ import annotations

import torch
from torch import nn

from kernels.fused_norm import add_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.fused = fused  # one Triton launch (kernels.fused_norm) instead of the torch ops below

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x). The sum is made in place in `residual`; without a
        residual, x itself becomes the residual stream (it is added to in place later)."""
        if self.fused and x.dim() == 2:
            return add_rms_norm(x, residual, self.weight, self.eps), (x if residual is None else residual)
        if residual is not None:
            x = residual.add_(x)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), x
