"""Plain floating-point weights: nn.Linear's [out, in] matrix, sliced per rank. The unquantized
format's loader uses it, and every quantized format for the layers it leaves in float (lm_head,
ignored modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.sharding import Axis, LinearShard, Role, TensorSource, read_shard
from quant.base import PackedLinear

WEIGHT = Role("weight", (Axis.N, Axis.K))


class DenseLinear(PackedLinear):
    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0])
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


def load_dense(weights: TensorSource, shard: LinearShard) -> DenseLinear:
    """The rank's slice of a float layer."""
    return DenseLinear(read_shard(weights, WEIGHT, shard))
