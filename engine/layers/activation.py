"""SwiGLU's activation: SiLU(gate) * up over the merged gate_up projection's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.silu_mul import silu_mul


class SiluAndMul(nn.Module):
    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused  # one Triton launch (kernels.silu_mul) instead of chunk, silu and mul

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused and gate_up.dim() == 2:
            return silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
