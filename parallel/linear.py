"""Tensor-parallel linear layers.

Each layer knows how it is split (its `LinearShard`) and asks the checkpoint's `WeightsLoader`
for this rank's weight in that format; it adds the bias and joins ranks where the split needs it.
Column-parallel layers leave their output split (the next row-parallel layer consumes it);
row-parallel layers sum partial outputs with one all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from parallel.collectives import all_gather, all_reduce
from parallel.sharding import (Axis, LinearShard, Role, TensorSource, column_shard, qkv_shard,
                               read_shard, replicated_shard, row_shard)
from parallel.state import ParallelContext

if TYPE_CHECKING:  # loaders are passed in; parallel never imports a format
    from quant.base import WeightsLoader

BIAS = Role("bias", (Axis.N,))


class ParallelLinear(nn.Module):
    def __init__(self, shard: LinearShard, weights: TensorSource, loader: "WeightsLoader",
                 ctx: ParallelContext, bias: bool):
        super().__init__()
        self.shard = shard
        self.ctx = ctx
        self.linear = loader.load_linear(weights, shard)
        self.bias = nn.Parameter(read_shard(weights, BIAS, shard), requires_grad=False) if bias else None

    @property
    def in_features(self) -> int:
        return self.shard.local_in_features

    @property
    def out_features(self) -> int:
        return self.shard.local_out_features

    def extra_repr(self) -> str:
        s = self.shard
        return f"{s.layout.value}, prefix={s.prefix}, in={s.local_in_features}/{s.in_features}, " \
               f"out={s.local_out_features}/{s.out_features}, bias={self.bias is not None}"


class ReplicatedLinear(ParallelLinear):
    def __init__(self, prefix: str, in_features: int, out_features: int, weights: TensorSource,
                 loader: "WeightsLoader", ctx: ParallelContext, bias: bool = False):
        super().__init__(replicated_shard(prefix, in_features, out_features), weights, loader, ctx, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + self.bias if self.bias is not None else y


class ColumnParallelLinear(ParallelLinear):
    """Output features split across ranks. `parts` are (prefix, size) blocks: one for a plain
    layer, several for a merged one (gate_up: [(gate, I), (up, I)])."""

    def __init__(self, parts: Sequence[tuple[str, int]], in_features: int, weights: TensorSource,
                 loader: "WeightsLoader", ctx: ParallelContext, bias: bool = False, gather_output: bool = False):
        shard = column_shard(parts, in_features, ctx.rank, ctx.world_size)
        super().__init__(shard, weights, loader, ctx, bias)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.bias is not None:
            y = y + self.bias
        return all_gather(y, self.ctx) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several same-input layers in one matmul (gate and up projections)."""

    def __init__(self, prefixes: Sequence[str], sizes: Sequence[int], in_features: int, weights: TensorSource,
                 loader: "WeightsLoader", ctx: ParallelContext, bias: bool = False):
        super().__init__(list(zip(prefixes, sizes)), in_features, weights, loader, ctx, bias)
        self.local_sizes = [s // ctx.world_size for s in sizes]


class QKVParallelLinear(ParallelLinear):
    """Query, key and value projections in one matmul; query heads split across ranks, KV heads
    split too, or replicated when there are more ranks than KV heads."""

    def __init__(self, prefixes: Sequence[str], hidden_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, weights: TensorSource, loader: "WeightsLoader", ctx: ParallelContext,
                 bias: bool = False):
        shard = qkv_shard(prefixes, hidden_size, num_heads, num_kv_heads, head_dim, ctx.rank, ctx.world_size,
                          fused=len(prefixes) == 1)
        super().__init__(shard, weights, loader, ctx, bias)
        q, k, v = shard.block_sizes()
        self.local_sizes = [q, k, v]
        self.num_local_heads = q // head_dim
        self.num_local_kv_heads = k // head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + self.bias if self.bias is not None else y


class RowParallelLinear(ParallelLinear):
    """Input features split across ranks; partial outputs summed by all-reduce. The bias is
    added once, on rank 0, before the sum."""

    def __init__(self, prefix: str, in_features: int, out_features: int, weights: TensorSource,
                 loader: "WeightsLoader", ctx: ParallelContext, bias: bool = False, unit: int = 1,
                 reduce_results: bool = True):
        shard = row_shard(prefix, in_features, out_features, ctx.rank, ctx.world_size, unit)
        super().__init__(shard, weights, loader, ctx, bias)
        self.reduce_results = reduce_results

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.bias is not None and self.ctx.rank == 0:
            y = y + self.bias
        return all_reduce(y, self.ctx) if self.reduce_results else y
