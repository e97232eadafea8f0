"""The code / scale / true-zero-point convention (quant.calibrate.rtn), exact round trips."""

from __future__ import annotations

import pytest
import torch

from quant.calibrate import HessianAccumulator, QuantArgs, compute_qparams, gptq_quantize, rtn_quantize

STEP = 0.125  # a power of two: every value below and every scale is exact in float32
GROUP = 256   # room for all 2^8 codes in one group


def exact_groups(bits: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight [rows, 4 * GROUP] built from codes and zeros: group 0 all >= 0 (zero 0), group 1
    all <= 0 (zero max), groups 2-3 straddling 0 at random zeros. Returns weight, codes, zeros."""
    gen = torch.Generator().manual_seed(seed)
    max_code = (1 << bits) - 1
    codes = torch.randint(0, max_code + 1, (rows, 4, GROUP), generator=gen)
    codes[:, :, 0], codes[:, :, 1] = 0, max_code  # both ends present: min/max fix the scale to STEP
    zeros = torch.randint(1, max_code, (rows, 4), generator=gen)
    zeros[:, 0], zeros[:, 1] = 0, max_code
    weight = (codes - zeros.unsqueeze(-1)).float() * STEP
    return weight.reshape(rows, -1), codes.reshape(rows, -1), zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_round_trip_is_exact_with_true_zero_points(bits):
    weight, codes, zeros = exact_groups(bits, rows=8, seed=bits)
    max_code = (1 << bits) - 1
    assert (weight[:, :GROUP] >= 0).all() and (weight[:, GROUP:2 * GROUP] <= 0).all()
    args = QuantArgs(bits=bits, group_size=GROUP, sym=False)
    # A diagonal Hessian makes GPTQ exact too (no error to propagate: every value is on the grid).
    hessian = torch.diag(torch.rand(weight.shape[1]) + 0.5)
    for result in (rtn_quantize(weight, args), gptq_quantize(weight, hessian, args)):
        assert torch.equal(result.zeros, zeros.to(torch.int32))
        assert result.zeros[:, 0].tolist() == [0] * 8 and result.zeros[:, 1].tolist() == [max_code] * 8
        assert torch.equal(result.scales, torch.full((8, 4), STEP))
        assert torch.equal(result.codes, codes.to(torch.int32))
        assert torch.equal(result.dequantize(), weight)
        assert result.loss == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_points_and_codes_stay_in_range_under_gptq(bits):
    # Error propagation pushes values past their group's range; codes clamp, zeros never wrap.
    gen = torch.Generator().manual_seed(10 + bits)
    weight = torch.rand(16, 128, generator=gen) + 0.01
    weight[:, 32:64] *= -1                          # all-negative group
    weight[:, 64:96] -= 0.5                          # straddling group
    x = torch.randn(512, 128, generator=gen) @ (torch.randn(128, 128, generator=gen) / 11 + torch.eye(128))
    accumulator = HessianAccumulator(128)
    accumulator.add_batch(x)
    result = gptq_quantize(weight, accumulator.hessian, QuantArgs(bits=bits, group_size=32, sym=False))
    max_code = (1 << bits) - 1
    assert result.zeros[:, 0].tolist() == [0] * 16 and result.zeros[:, 1].tolist() == [max_code] * 16
    assert int(result.zeros.min()) >= 0 and int(result.zeros.max()) <= max_code
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= max_code
    assert int(result.codes.max()) == max_code and int(result.codes.min()) == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_convention_matches_llm_compressor(bits):
    gen = torch.Generator().manual_seed(20 + bits)
    weight = torch.randn(6, 64, generator=gen)
    result = rtn_quantize(weight, QuantArgs(bits=bits, group_size=32, sym=True))
    max_code, half = (1 << bits) - 1, 1 << (bits - 1)
    absmax = weight.reshape(6, 2, 32).abs().amax(-1)
    assert torch.equal(result.scales, absmax / (max_code / 2))  # llm-compressor: absmax / (bit_range / 2)
    assert torch.equal(result.zeros, torch.full((6, 2), half, dtype=torch.int32))
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= max_code
    # Signed codes are ours minus 2^(bits-1): +absmax rounds to +2^(bits-1), one past the top, and
    # is clipped to max_code; -absmax lands on code 0 (or 1 when w / scale rounds to just above
    # -2^(bits-1) in float32, as in llm-compressor). Everything else is within half a step.
    grouped_w, grouped_codes = weight.reshape(6, 2, 32), result.codes.reshape(6, 2, 32)
    at_extremes = grouped_w.abs() == absmax.unsqueeze(-1)
    positive_extremes = grouped_codes[at_extremes & (grouped_w > 0)]
    negative_extremes = grouped_codes[at_extremes & (grouped_w < 0)]
    assert positive_extremes.numel() > 0 and negative_extremes.numel() > 0
    assert (positive_extremes == max_code).all() and (negative_extremes <= 1).all()
    step = result.scales.repeat_interleave(32, dim=1)
    error = (result.dequantize() - weight).abs()
    assert (error[~at_extremes.reshape(6, 64)] <= step[~at_extremes.reshape(6, 64)] * 0.5001).all()


def test_all_zero_group_gets_scale_one_and_dequantizes_to_zero():
    weight = torch.zeros(2, 64)
    weight[1, 32:] = torch.linspace(-1, 1, 32)
    for sym in (True, False):
        result = rtn_quantize(weight, QuantArgs(bits=4, group_size=32, sym=sym))
        assert result.scales[0].tolist() == [1.0, 1.0] and result.scales[1, 0] == 1.0
        assert torch.equal(result.dequantize()[0], torch.zeros(64))
        assert result.zeros[0, 0] == (8 if sym else 0)


def test_tensor_strategy_shares_one_scale():
    weight = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    scales, zeros = compute_qparams(weight, QuantArgs(bits=4, strategy="tensor", sym=False), 40)
    assert scales.shape == (5, 1) and torch.unique(scales).numel() == 1 and torch.unique(zeros).numel() == 1
    assert float(scales[0, 0]) == pytest.approx(float(weight.max() - weight.min()) / 15)


def test_rtn_loss_is_half_squared_error():
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    result = rtn_quantize(weight, QuantArgs(bits=3, group_size=16, sym=False))
    assert result.loss == pytest.approx(0.5 * float(((weight - result.dequantize()) ** 2).sum()), rel=1e-5)
