"""GPTQ (quant.calibrate.gptq) against round-to-nearest, on layers with known Hessians."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from quant.calibrate import HessianAccumulator, QuantArgs, gptq_quantize, rtn_quantize

K, N, TOKENS = 256, 48, 1024


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: a second OpenMP thread only adds contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_activations(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with mixed (correlated) features and uneven per-feature scales: a non-diagonal H."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=gen) / features ** 0.5 + torch.eye(features)
    feature_scales = torch.rand(features, generator=gen) * 2 + 0.1
    return torch.randn(tokens, features, generator=gen) @ mixing * feature_scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator(x.shape[-1])
    accumulator.add_batch(x)
    return accumulator.hessian


@pytest.fixture(scope="module")
def layer():
    x = correlated_activations(TOKENS, K, seed=0)
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    return weight, x, hessian_of(x)


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - dequantized) @ x.T).norm())


def damped_quadratic_loss(weight, dequantized, hessian, percdamp=0.01) -> float:
    """0.5 * sum_rows d H_damped d^T: what GPTQ's accumulated loss must equal exactly."""
    damped = hessian + percdamp * hessian.diagonal().mean() * torch.eye(hessian.shape[0])
    delta = (weight - dequantized).double()
    return 0.5 * float(torch.einsum("nk,kl,nl->", delta, damped.double(), delta))


# Measured GPTQ/RTN output-error ratios on this layer: 0.60-0.77 (act order 0.60-0.69).
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,actorder", [(32, "none"), (32, "group"), (-1, "weight"), (64, "static")])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(layer, bits, group_size, actorder, sym):
    weight, x, hessian = layer
    args = QuantArgs(bits=bits, group_size=group_size, sym=sym, actorder=actorder)
    gptq = gptq_quantize(weight, hessian, args)
    rtn = rtn_quantize(weight, args)
    ratio = output_error(weight, gptq.dequantize(), x) / output_error(weight, rtn.dequantize(), x)
    assert ratio < 0.80, f"GPTQ/RTN output error {ratio:.3f}"
    if actorder != "none":
        assert ratio < 0.72, f"act order should help further: {ratio:.3f}"


@pytest.mark.parametrize("strategy,actorder", [("channel", "none"), ("channel", "weight"), ("tensor", "none"),
                                               ("tensor", "static")])
def test_gptq_beats_rtn_for_channel_and_tensor(layer, strategy, actorder):
    weight, x, hessian = layer
    args = QuantArgs(bits=4, strategy=strategy, sym=False, actorder=actorder)
    gptq = gptq_quantize(weight, hessian, args)
    rtn = rtn_quantize(weight, args)
    assert gptq.scales.shape == (N, 1) and gptq.group_size == K
    ratio = output_error(weight, gptq.dequantize(), x) / output_error(weight, rtn.dequantize(), x)
    assert ratio < 0.80, f"GPTQ/RTN output error {ratio:.3f}"


@pytest.mark.parametrize("actorder", ["none", "group", "weight"])
def test_loss_is_the_damped_quadratic_error_of_dequantize(layer, actorder):
    # Sum_i err_i^2 / 2 = 0.5 tr(D H D^T) exactly when the propagated error is dequantize()'s.
    weight, _, hessian = layer
    result = gptq_quantize(weight, hessian, QuantArgs(bits=3, group_size=32, sym=False, actorder=actorder))
    expected = damped_quadratic_loss(weight, result.dequantize(), hessian)
    assert result.loss == pytest.approx(expected, rel=1e-4)
    assert result.loss > 0


@pytest.mark.parametrize("actorder", ["none", "weight", "static"])
@pytest.mark.parametrize("bits,sym", [(2, False), (4, True), (8, False)])
def test_diagonal_hessian_reduces_to_rtn(actorder, bits, sym):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(N, K, generator=gen)
    hessian = torch.diag(torch.rand(K, generator=gen) * 5 + 0.01)
    args = QuantArgs(bits=bits, group_size=64, sym=sym, actorder=actorder)
    gptq, rtn = gptq_quantize(weight, hessian, args), rtn_quantize(weight, args)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)
    assert torch.equal(gptq.g_idx, rtn.g_idx)


def test_actorder_group_permutes_groups_consistently(layer):
    weight, _, hessian = layer
    group_size = 32
    result = gptq_quantize(weight, hessian, QuantArgs(bits=4, group_size=group_size, actorder="group"))
    assert result.g_idx.dtype == torch.int32 and result.g_idx.shape == (K,)
    assert not result.has_trivial_g_idx
    assert torch.bincount(result.g_idx.long()).tolist() == [group_size] * (K // group_size)

    # Groups are runs of the descending-H-diagonal order.
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    assert torch.equal(result.g_idx[order].long(), torch.arange(K) // group_size)

    # dequantize() is (codes - zero) * scale of each column's own group.
    dequantized = result.dequantize()
    for group in range(K // group_size):
        columns = result.g_idx == group
        expected = (result.codes[:, columns] - result.zeros[:, group:group + 1]).float() \
            * result.scales[:, group:group + 1]
        assert torch.equal(dequantized[:, columns], expected)


def test_actorder_group_equals_plain_gptq_on_the_permuted_problem(layer):
    weight, _, hessian = layer
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    acted = gptq_quantize(weight, hessian, QuantArgs(bits=4, group_size=32, actorder="group"))
    plain = gptq_quantize(weight[:, order], hessian[order][:, order], QuantArgs(bits=4, group_size=32))
    assert torch.equal(acted.codes[:, order], plain.codes)
    assert torch.equal(acted.scales, plain.scales) and torch.equal(acted.zeros, plain.zeros)
    assert acted.loss == pytest.approx(plain.loss, rel=1e-6)


def test_actorder_weight_and_static_keep_trivial_g_idx_and_agree(layer):
    weight, _, hessian = layer
    weight_order = gptq_quantize(weight, hessian, QuantArgs(bits=4, group_size=32, actorder="weight"))
    static = gptq_quantize(weight, hessian, QuantArgs(bits=4, group_size=32, actorder="static"))
    none = gptq_quantize(weight, hessian, QuantArgs(bits=4, group_size=32))
    assert weight_order.has_trivial_g_idx and static.has_trivial_g_idx
    assert torch.equal(weight_order.g_idx, torch.arange(K, dtype=torch.int32) // 32)
    assert torch.equal(weight_order.codes, static.codes)
    # Params come from the unpermuted weight, as with no act order; only the codes differ.
    assert torch.equal(weight_order.scales, none.scales) and torch.equal(weight_order.zeros, none.zeros)
    assert not torch.equal(weight_order.codes, none.codes)


def test_codes_are_recoverable_from_dequantized_weight(layer):
    # A writer that re-derives codes from the float weight with our params gets the same codes.
    weight, _, hessian = layer
    result = gptq_quantize(weight, hessian, QuantArgs(bits=3, group_size=32, sym=False, actorder="group"))
    g = result.g_idx.long()
    scales, zeros = result.scales[:, g], result.zeros[:, g]
    recovered = torch.clamp(torch.round(result.dequantize() / scales) + zeros, 0, 7).to(torch.int32)
    assert torch.equal(recovered, result.codes)


def test_dead_columns_are_zeroed_and_the_rest_still_beats_rtn():
    x = correlated_activations(TOKENS, K, seed=3)
    dead = torch.tensor([0, 5, 100, 255])
    x[:, dead] = 0
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(4))
    args = QuantArgs(bits=4, group_size=32, sym=False, actorder="group")
    result = gptq_quantize(weight, hessian_of(x), args)
    dequantized = result.dequantize()
    assert torch.isfinite(dequantized).all() and math.isfinite(result.loss)
    assert torch.equal(dequantized[:, dead], torch.zeros(N, len(dead)))
    # Dead columns sort last in act order: they form the tail of the last group.
    assert result.g_idx[dead].tolist() == [K // 32 - 1] * len(dead)
    ratio = output_error(weight, dequantized, x) / output_error(weight, rtn_quantize(weight, args).dequantize(), x)
    assert ratio < 0.80


@pytest.mark.parametrize("broken", ["nan", "negative_definite"])
def test_uninvertible_hessian_falls_back_to_rtn_with_a_warning(layer, caplog, broken):
    weight, _, hessian = layer
    bad = hessian.clone()
    if broken == "nan":
        bad[3, 7] = float("nan")
    else:
        bad = -bad
    args = QuantArgs(bits=4, group_size=32, sym=False, actorder="group")
    with caplog.at_level(logging.WARNING, logger="quant.calibrate.gptq"):
        result = gptq_quantize(weight, bad, args, name="model.layers.3.mlp.down_proj")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "model.layers.3.mlp.down_proj" in messages[0]
    assert "round-to-nearest" in messages[0]
    rtn = rtn_quantize(weight, args)
    assert torch.equal(result.codes, rtn.codes) and torch.equal(result.scales, rtn.scales)
    assert result.has_trivial_g_idx and result.loss == rtn.loss


def test_sparse_weight_keeps_its_zeros(layer):
    weight, x, hessian = layer
    pruned = weight * (torch.rand(N, K, generator=torch.Generator().manual_seed(5)) > 0.5)
    args = QuantArgs(bits=4, group_size=32, sym=False)
    kept = gptq_quantize(pruned, hessian, args).dequantize()  # 50% zeros >= 5%: preserved automatically
    assert torch.equal(kept[pruned == 0], torch.zeros(int((pruned == 0).sum())))
    filled = gptq_quantize(pruned, hessian, args, preserve_zeros=False).dequantize()
    # Without the mask, error compensation moves some of them off zero (measured: 10.6%).
    assert (filled[pruned == 0] != 0).float().mean() > 0.05


def test_blocksize_does_not_change_the_result(layer):
    weight, _, hessian = layer
    args = QuantArgs(bits=4, group_size=32)
    results = [gptq_quantize(weight, hessian, args, blocksize=b) for b in (16, 128, 1000)]
    for other in results[1:]:
        # Same math, different summation order: at most a handful of rounding ties flip.
        assert (other.codes != results[0].codes).float().mean() < 1e-3
        assert other.loss == pytest.approx(results[0].loss, rel=1e-3)


def test_accepts_half_precision_weight_and_returns_documented_dtypes(layer):
    weight, _, hessian = layer
    result = gptq_quantize(weight.to(torch.bfloat16), hessian, QuantArgs(bits=4, group_size=64, sym=False))
    assert result.codes.dtype == torch.int32 and result.zeros.dtype == torch.int32
    assert result.scales.dtype == torch.float32 and result.g_idx.dtype == torch.int32
    assert result.scales.shape == result.zeros.shape == (N, K // 64)
    assert result.dequantize().dtype == torch.float32
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= 15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(layer):
    weight, _, hessian = layer
    args = QuantArgs(bits=4, group_size=32, sym=False, actorder="group")
    cpu = gptq_quantize(weight, hessian, args)
    gpu = gptq_quantize(weight.cuda(), hessian.cuda(), args)
    assert gpu.codes.device.type == "cuda" and gpu.scales.device.type == "cuda"
    assert torch.equal(gpu.g_idx.cpu(), cpu.g_idx) and torch.equal(gpu.zeros.cpu(), cpu.zeros)
    assert (gpu.codes.cpu() != cpu.codes).float().mean() < 0.01
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-2)
