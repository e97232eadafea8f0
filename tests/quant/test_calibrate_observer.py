"""The MSE observer (QuantArgs(observer="mse")): per-group range shrinking that never does worse
than min-max on the error it minimises, and leaves exactly representable groups exact."""

from __future__ import annotations

import pytest
import torch

from quant.calibrate import HessianAccumulator, QuantArgs, compute_qparams, gptq_quantize, rtn_quantize
from quant.calibrate.rtn import MSE_NORM
from tests.quant.test_calibrate_rtn import GROUP, exact_groups


def heavy_tailed_weight(seed: int, rows: int = 48, columns: int = 256) -> torch.Tensor:
    """Gaussian weights with a few large outliers: min-max wastes range on them, MSE need not."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=gen) * 0.02
    outliers = torch.rand(rows, columns, generator=gen) < 0.01
    return torch.where(outliers, weight * 8, weight)


def group_errors(weight: torch.Tensor, result, group_size: int, norm: float) -> torch.Tensor:
    """[N, G] sum over each group of |dequantized - weight|^norm."""
    delta = (result.dequantize() - weight).abs().pow(norm)
    return delta.reshape(weight.shape[0], -1, group_size).sum(-1)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_mse_error_is_never_above_minmax_per_group(bits, sym):
    weight = heavy_tailed_weight(seed=bits + 10 * sym)
    minmax = rtn_quantize(weight, QuantArgs(bits=bits, group_size=64, sym=sym))
    mse = rtn_quantize(weight, QuantArgs(bits=bits, group_size=64, sym=sym, observer="mse"))
    # The searched objective: per group, never above min-max (p = 1 is a candidate).
    assert bool((group_errors(weight, mse, 64, MSE_NORM) <= group_errors(weight, minmax, 64, MSE_NORM)).all())
    # It shrinks ranges only, and on these heavy tails it lowers the plain squared error clearly.
    assert bool((mse.scales <= minmax.scales).all()) and bool((mse.scales < minmax.scales).any())
    squared_minmax = float(((minmax.dequantize() - weight) ** 2).mean())
    squared_mse = float(((mse.dequantize() - weight) ** 2).mean())
    assert squared_mse < 0.95 * squared_minmax, (squared_mse, squared_minmax)
    assert 0 <= int(mse.codes.min()) and int(mse.codes.max()) <= (1 << bits) - 1
    assert 0 <= int(mse.zeros.min()) and int(mse.zeros.max()) <= (1 << bits) - 1


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_keeps_exactly_representable_groups_exact(bits):
    weight, codes, zeros = exact_groups(bits, rows=4, seed=bits)
    args = QuantArgs(bits=bits, group_size=GROUP, sym=False, observer="mse")
    hessian = torch.diag(torch.rand(weight.shape[1]) + 0.5)
    for result in (rtn_quantize(weight, args), gptq_quantize(weight, hessian, args)):
        assert torch.equal(result.codes, codes.to(torch.int32))
        assert torch.equal(result.zeros, zeros.to(torch.int32))
        assert torch.equal(result.dequantize(), weight)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_with_mse_is_rtn_with_mse_under_a_diagonal_hessian(sym):
    weight = heavy_tailed_weight(seed=3, rows=16, columns=128)
    args = QuantArgs(bits=4, group_size=32, sym=sym, observer="mse")
    result = gptq_quantize(weight, torch.diag(torch.rand(128) + 0.5), args)
    rtn = rtn_quantize(weight, args)
    assert torch.equal(result.codes, rtn.codes) and torch.equal(result.scales, rtn.scales)
    assert torch.equal(result.scales, compute_qparams(weight, args, 32)[0])


def test_gptq_with_mse_beats_rtn_with_mse_on_a_correlated_hessian():
    gen = torch.Generator().manual_seed(5)
    weight = heavy_tailed_weight(seed=5, rows=32, columns=128)
    x = torch.randn(1024, 128, generator=gen) @ (torch.randn(128, 128, generator=gen) / 8 + torch.eye(128))
    accumulator = HessianAccumulator(128)
    accumulator.add_batch(x)
    args = QuantArgs(bits=4, group_size=32, sym=False, observer="mse", actorder="weight")

    def output_error(result) -> float:
        return float(((result.dequantize() - weight) @ x.t()).norm())

    assert output_error(gptq_quantize(weight, accumulator.hessian, args)) < 0.9 * output_error(rtn_quantize(weight, args))


def test_unknown_observer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown observer 'percentile'; choose one of"):
        QuantArgs(observer="percentile")
