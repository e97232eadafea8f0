"""gather_to_rank0 and the LM head on real gloo ranks: rank 0 holds every rank's part, concatenated
in rank order, bit for bit; the other ranks hold nothing (None from the collective, an empty
[..., 0] tensor from the LM head), at TP 1, 2 and 3."""

from __future__ import annotations

import pytest
import torch

from engine.weights import Weights
from parallel.collectives import enable_timing, gather_to_rank0
from parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from tests.quant.checkpoints import save_checkpoint
from tests.spawn_ranks import run_ranks

TP_SIZES = (1, 2, 3)
VOCAB, HIDDEN = 37, 16  # 37 rows: 19 / 13 per rank at TP 2 / 3, the last rank zero-padded
CASES = [((3, 5), -1, torch.float32), ((2, 3, 7), -1, torch.bfloat16), ((4, 6), 0, torch.float16),
         ((2, 3, 7), 1, torch.float32)]


def rank_part(shape, dtype, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(shape, generator=gen).to(dtype)


def _gather_on_rank(ctx):
    timer = enable_timing()
    try:
        got = [gather_to_rank0(rank_part(shape, dtype, ctx.rank), ctx, dim=dim) for shape, dim, dtype in CASES]
        calls = timer.summary().get("gather", {}).get("calls", 0)
    finally:
        enable_timing(False)
    return got, calls


@pytest.mark.parametrize("tp", TP_SIZES)
def test_gather_to_rank0_concatenates_on_rank0_only(tp):
    results = run_ranks(tp, _gather_on_rank)
    got, calls = results[0]
    for (shape, dim, dtype), tensor in zip(CASES, got):
        want = torch.cat([rank_part(shape, dtype, r) for r in range(tp)], dim=dim)
        assert tensor.dtype == dtype and torch.equal(tensor, want), (shape, dim, dtype)
    for rank, (other, _) in enumerate(results[1:], start=1):
        assert other == [None] * len(CASES), f"rank {rank} holds {other}"
    assert calls == (len(CASES) if tp > 1 else 0)  # TP 1: no collective at all
    assert all(c == calls for _, c in results)


def _heads_on_rank(ctx, path):
    """Logits of the untied and the tied head (which reads the embedding's shard)."""
    weights = Weights(path, rank=ctx.rank, world_size=ctx.world_size)
    embed = VocabParallelEmbedding("embed", VOCAB, HIDDEN, weights, ctx)
    heads = [ParallelLMHead("head", VOCAB, HIDDEN, weights, ctx), ParallelLMHead(None, VOCAB, HIDDEN, weights, ctx,
                                                                                 tied_to=embed)]
    hidden = torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        return [head(hidden) for head in heads]


@pytest.mark.parametrize("tp", TP_SIZES)
def test_lm_head_logits_on_rank0_equal_single_rank(tmp_path, tp):
    gen = torch.Generator().manual_seed(3)
    tensors = {"head.weight": torch.randn(VOCAB, HIDDEN, generator=gen),
               "embed.weight": torch.randn(VOCAB, HIDDEN, generator=gen)}
    save_checkpoint(tmp_path, tensors)
    logits = run_ranks(tp, _heads_on_rank, tmp_path)
    single = run_ranks(1, _heads_on_rank, tmp_path)[0]
    hidden = torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(5))
    for got, one, weight in zip(logits[0], single, ("head.weight", "embed.weight")):
        assert got.shape == (2, 3, VOCAB), weight
        torch.testing.assert_close(got, hidden @ tensors[weight].T, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, one, rtol=0, atol=1e-5)
    for rank, others in enumerate(logits[1:], start=1):
        assert [tuple(o.shape) for o in others] == [(2, 3, 0)] * 2, f"rank {rank}"
