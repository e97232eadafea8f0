"""The "none" format: float checkpoints, each rank reading its slice of every weight."""

from __future__ import annotations

from typing import Any

from parallel.sharding import LinearShard, TensorSource
from quant.base import PackedLinear, WeightsLoader, register
from quant.common.dense import load_dense


@register("none")
class UnquantizedLoader(WeightsLoader):
    method = "none"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "UnquantizedLoader":
        return cls()

    def load_linear(self, weights: TensorSource, shard: LinearShard) -> PackedLinear:
        return load_dense(weights, shard)
