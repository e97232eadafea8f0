"""Plain floating-point weights: nn.Linear's [out, in] matrix, sliced per rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from parallel.sharding import Axis, LinearShard, Role, TensorSource, read_shard
from quant.base import PackedLinear, WeightsLoader, register

WEIGHT = Role("weight", (Axis.N, Axis.K))


class DenseLinear(PackedLinear):
    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0])
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


@register("none")
class UnquantizedLoader(WeightsLoader):
    method = "none"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "UnquantizedLoader":
        return cls()

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        return DenseLinear(read_shard(weights, WEIGHT, shard))


def load_dense(weights: TensorSource, shard: LinearShard) -> DenseLinear:
    """Quantized formats use this for layers they leave in float (lm_head, ignored modules)."""
    return DenseLinear(read_shard(weights, WEIGHT, shard))
