"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split into equal ranges of ceil(V / TP) rows (the last rank zero-padded). The
embedding looks up the ids that fall in the rank's range and all-reduces; the LM head computes
logits for the rank's range and gathers them to rank 0, the only rank that samples (a gather, not
an all-gather: the other ranks never read them). A tied head reuses the embedding's shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.collectives import all_reduce, gather_to_rank0
from parallel.sharding import Axis, Block, Layout, LinearShard, Role, TensorSource, column_shard, read_shard
from parallel.state import ParallelContext

_ROWS = Role("weight", (Axis.N, Axis.K))


def vocab_range(vocab_size: int, ctx: ParallelContext) -> tuple[int, int, int]:
    """(start, stop, rows per rank) of this rank's part of the vocabulary."""
    per_rank = -(-vocab_size // ctx.world_size)
    start = min(ctx.rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size), per_rank


def _read_vocab_rows(prefix: str, vocab_size: int, hidden_size: int, weights: TensorSource,
                     ctx: ParallelContext) -> torch.Tensor:
    start, stop, per_rank = vocab_range(vocab_size, ctx)
    shard = LinearShard(Layout.COLUMN, hidden_size, (Block(prefix, 0, vocab_size, start, stop),),
                        0, hidden_size, ctx.rank, ctx.world_size)
    rows = read_shard(weights, _ROWS, shard)
    if rows.shape[0] < per_rank:
        rows = F.pad(rows, (0, 0, 0, per_rank - rows.shape[0]))
    return rows


class VocabParallelEmbedding(nn.Module):
    def __init__(self, prefix: str, vocab_size: int, hidden_size: int, weights: TensorSource, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.start, self.stop, _ = vocab_range(vocab_size, ctx)
        self.weight = nn.Parameter(_read_vocab_rows(prefix, vocab_size, hidden_size, weights, ctx),
                                   requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return F.embedding(token_ids, self.weight)
        mine = (token_ids >= self.start) & (token_ids < self.stop)
        local = torch.where(mine, token_ids - self.start, 0)
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.ctx)


class ParallelLMHead(nn.Module):
    """Logits over the whole vocabulary on rank 0 (the driver samples from them); on the other ranks
    an empty [..., 0] tensor, so callers (CUDA-graph capture included) still get a tensor."""

    def __init__(self, prefix: str | None, vocab_size: int, hidden_size: int, weights: TensorSource,
                 ctx: ParallelContext, tied_to: VocabParallelEmbedding | None = None, loader=None):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.quantized = None
        if tied_to is not None:
            self.weight = tied_to.weight
        elif loader is not None and not weights.has(f"{prefix}.weight"):
            # A quantized head (exl2's head_bits, GPTQ's lm_head=True): the format's loader reads it,
            # column-parallel over the vocabulary.
            self.quantized = loader.load_linear(weights, column_shard([(prefix, vocab_size)], hidden_size,
                                                                       ctx.rank, ctx.world_size))
        else:
            self.weight = nn.Parameter(_read_vocab_rows(prefix, vocab_size, hidden_size, weights, ctx),
                                       requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.quantized(hidden) if self.quantized is not None else F.linear(hidden, self.weight)
        if self.ctx.world_size > 1:
            logits = gather_to_rank0(logits, self.ctx, dim=-1)
            if logits is None:
                return hidden.new_empty((*hidden.shape[:-1], 0))
        return logits[..., : self.vocab_size]
