"""QuantArgs validation and the errors of bad inputs to rtn_quantize / gptq_quantize."""

from __future__ import annotations

import pytest
import torch

from quant.calibrate import QuantArgs, gptq_quantize, largest_dividing_group_size, rtn_quantize


def test_defaults_and_aliases():
    args = QuantArgs()
    assert (args.bits, args.group_size, args.sym, args.strategy, args.actorder) == (4, 128, True, "group", "none")
    assert QuantArgs(actorder="dynamic").actorder == "group"
    assert QuantArgs(actorder=None).actorder == "none"
    assert QuantArgs(actorder="STATIC", strategy="Group").actorder == "static"
    assert QuantArgs(strategy="channel").group_size == -1
    assert QuantArgs(group_size=-1).columns_per_group(576) == 576


@pytest.mark.parametrize("bits", [5, 1, 16, 0])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=rf"bits={bits} is not supported; choose one of \(2, 3, 4, 8\)"):
        QuantArgs(bits=bits)


@pytest.mark.parametrize("in_features,requested,largest", [(576, 128, 96), (1536, 1000, 768), (100, 128, 100),
                                                           (97, 64, 1), (4096, 4096, 4096)])
def test_largest_dividing_group_size(in_features, requested, largest):
    assert largest_dividing_group_size(in_features, requested) == largest


def test_group_size_not_dividing_k_names_the_largest_valid_one():
    weight = torch.randn(8, 576)
    with pytest.raises(ValueError, match="group_size 128 does not divide the layer's 576 input columns; "
                                         "the largest group size that divides 576 is 96"):
        rtn_quantize(weight, QuantArgs(group_size=128))
    with pytest.raises(ValueError, match="largest group size that divides 576 is 96"):
        gptq_quantize(weight, torch.eye(576), QuantArgs(group_size=128))


def test_unknown_strategy_and_actorder():
    with pytest.raises(ValueError, match=r"unknown strategy 'block'; choose one of \('tensor', 'channel', 'group'\)"):
        QuantArgs(strategy="block")
    with pytest.raises(ValueError, match=r"unknown actorder 'desc'; choose one of \('none', 'static', 'group', "
                                         r"'weight'\)"):
        QuantArgs(actorder="desc")


def test_inconsistent_group_settings():
    with pytest.raises(ValueError, match="group_size=64 only applies to strategy 'group'"):
        QuantArgs(strategy="channel", group_size=64)
    with pytest.raises(ValueError, match="group_size=0 is invalid"):
        QuantArgs(group_size=0)
    with pytest.raises(ValueError, match="actorder 'group' permutes groups and needs strategy 'group'"):
        QuantArgs(strategy="tensor", actorder="group")


def test_bad_shapes_and_settings_of_gptq():
    args = QuantArgs(group_size=32)
    with pytest.raises(ValueError, match=r"hessian must be \[64, 64\] for a weight of shape \(8, 64\), got \(32, 32\)"):
        gptq_quantize(torch.randn(8, 64), torch.eye(32), args)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        gptq_quantize(torch.randn(64), torch.eye(64), args)
    with pytest.raises(ValueError, match="blocksize must be positive, got 0"):
        gptq_quantize(torch.randn(8, 64), torch.eye(64), args, blocksize=0)
    with pytest.raises(ValueError, match="percdamp must be >= 0, got -0.1"):
        gptq_quantize(torch.randn(8, 64), torch.eye(64), args, percdamp=-0.1)
