"""HessianAccumulator: the running mean equals 2/n * X^T X over every token seen."""

from __future__ import annotations

import pytest
import torch

from quant.calibrate import HessianAccumulator


def test_running_mean_over_uneven_batches_and_shapes():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 17, 24, generator=gen), torch.randn(1, 24, generator=gen),
               torch.randn(200, 24, generator=gen), torch.randn(2, 2, 5, 24, generator=gen)]
    accumulator = HessianAccumulator(24)
    for batch in batches:
        accumulator.add_batch(batch)
    tokens = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    assert accumulator.num_samples == tokens.shape[0] == 272
    expected = 2 / tokens.shape[0] * tokens.T @ tokens
    assert accumulator.hessian.dtype == torch.float32
    torch.testing.assert_close(accumulator.hessian.double(), expected, rtol=1e-5, atol=1e-5)


def test_one_batch_or_many_give_the_same_hessian():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    whole, pieces = HessianAccumulator(10), HessianAccumulator(10)
    whole.add_batch(x)
    for chunk in x.split(7):
        pieces.add_batch(chunk)
    torch.testing.assert_close(pieces.hessian, whole.hessian, rtol=1e-5, atol=1e-6)


def test_low_precision_inputs_accumulate_in_float32():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    accumulator = HessianAccumulator(8)
    accumulator.add_batch(x)
    exact = x.float()
    torch.testing.assert_close(accumulator.hessian, 2 / 32 * exact.T @ exact, rtol=1e-5, atol=1e-5)


def test_empty_and_missing_batches():
    accumulator = HessianAccumulator(4, device="cpu")
    accumulator.add_batch(torch.zeros(0, 4))
    with pytest.raises(RuntimeError, match="no activations were accumulated"):
        accumulator.hessian
    with pytest.raises(ValueError, match="activations have 5 features, expected 4"):
        accumulator.add_batch(torch.zeros(2, 5))
