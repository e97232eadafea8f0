"""AWQ: the packer (against AutoAWQ's packing), bad input, misaligned row shards converted exactly
to the GPTQ layout, and a tiny Llama end to end against its dequantized twin (TP 1 and 2)."""

from __future__ import annotations

import json

import pytest
import torch

from engine.weights import Weights
from kernels.layouts import AWQLayout, GPTQLayout
from parallel.sharding import column_shard, row_shard
from quant import QuantConfigError, get_loader
from quant.awq.packer import AWQPacker
from quant.calibrate import QuantArgs, QuantResult, rtn_quantize
from tests.helpers import engine_last_logits
from tests.quant.checkpoints import (PROMPTS, awq_tensors, export_with_reference, expected_slice, greedy_tokens,
                                     random_result, save_checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}

# Packed by AutoAWQ 0.2.9's WQLinear_GEMM.from_linear (run from its sdist): the layer of
# `_golden_result`, qweight [4, 4] and qzeros [1, 4].
AUTOAWQ_GOLDEN = (
    [[1603480672, -686054168, 1603480672, -686054168], [-1528270411, 744552765, -1528270411, 744552765],
     [-113392118, 1907707522, -113392118, 1907707522], [1317149535, -972385321, 1317149535, -972385321]],
    [[1966171168, -38146904, 1966171168, -38146904]],
)


def _golden_result() -> QuantResult:
    n, k = 32, 4
    codes = ((torch.arange(n)[:, None] * 3 + torch.arange(k)[None, :] * 5) % 16).int()
    zeros = (torch.arange(n)[:, None] % 16).int()
    return QuantResult(codes, torch.ones(n, 1), zeros, torch.zeros(k, dtype=torch.int32), k, 4, False, 0.0)


def test_packer_matches_autoawq():
    out = AWQPacker(-1).pack("x", _golden_result(), torch.float16)
    assert (out["x.qweight"].tolist(), out["x.qzeros"].tolist()) == AUTOAWQ_GOLDEN


def test_awq_order_nibble_i_holds_column_order_i():
    r = random_result(8, 32, 4, 32, sym=False)
    word = AWQPacker(32).pack("x", r, torch.float16)["x.qweight"][0, 0].item() & 0xFFFFFFFF
    for slot, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
        assert (word >> (4 * slot)) & 0xF == r.codes[column, 0]


def test_packer_refusals_and_config():
    with pytest.raises(ValueError, match=r"act-order .* cannot be written as AWQ"):
        AWQPacker(32).pack("x", random_result(8, 64, 4, 32, sym=False, act_order=True), torch.float16)
    with pytest.raises(ValueError, match=r"x: quantized with bits=3"):
        AWQPacker(32).pack("x", random_result(8, 64, 3, 32, sym=False), torch.float16)
    assert AWQPacker(64).quantization_config() == {"quant_method": "awq", "bits": 4, "group_size": 64,
                                                    "zero_point": True, "version": "gemm",
                                                    "modules_to_not_convert": None}


@pytest.mark.parametrize("field, value, match", [
    ("version", "gemv", r"version='gemv' is not supported; supported: gemm"),
    ("bits", 8, r"bits=8 is not supported; supported: 4"),
    ("zero_point", False, r"zero_point=false is not supported"),
    ("group_size", -3, r"group_size=-3 is invalid"),
])
def test_bad_config(field, value, match):
    with pytest.raises(QuantConfigError, match=match):
        get_loader({**CONFIG, field: value})


def test_autoawq_spelling_of_the_config(tmp_path):
    r = random_result(16, 64, 4, 16, sym=False)
    save_checkpoint(tmp_path, awq_tensors("x", r))
    loader = get_loader({"quant_method": "awq", "w_bit": 4, "q_group_size": 16, "zero_point": True, "version": "GEMM"})
    assert torch.equal(loader.load_linear(Weights(tmp_path), column_shard([("x", 16)], 64, 0, 1)).dequantize(),
                       r.dequantize())


def test_scales_missing_and_shape_mismatch(tmp_path):
    tensors = awq_tensors("x", random_result(16, 64, 4, 32, sym=False))
    save_checkpoint(tmp_path / "a", {k: v for k, v in tensors.items() if k != "x.scales"})
    with pytest.raises(QuantConfigError, match=r"tensor x.scales is missing from the awq checkpoint"):
        get_loader(CONFIG).load_linear(Weights(tmp_path / "a"), column_shard([("x", 16)], 64, 0, 1))
    save_checkpoint(tmp_path / "b", tensors)
    with pytest.raises(QuantConfigError, match=r"tensor x.qweight has shape \[64, 2\], expected \[64, 3\]"):
        get_loader(CONFIG).load_linear(Weights(tmp_path / "b"), column_shard([("x", 24)], 64, 0, 1))


def test_misaligned_row_shard_becomes_gptq_layout(tmp_path):
    """1152 rows, group 128, TP 2: rank 1 starts in the middle of group 4; AWQ has no g_idx to say
    so, hence an exact conversion to GPTQLayout with rebased group ids. Rank 0 stays AWQ."""
    r = random_result(40, 1152, 4, 128, sym=False)
    save_checkpoint(tmp_path, awq_tensors("x", r))
    loader = get_loader({**CONFIG, "group_size": 128})
    kinds = []
    for rank in range(2):
        shard = row_shard("x", 1152, 40, rank, 2)
        lin = loader.load_linear(Weights(tmp_path), shard)
        assert torch.equal(lin.dequantize(), expected_slice({"x": r.dequantize()}, shard))
        kinds.append(type(lin.prepared.layout))
    assert kinds == [AWQLayout, GPTQLayout]


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    quantize = lambda prefix, w: rtn_quantize(w, QuantArgs(bits=4, group_size=128, sym=False))  # noqa: E731
    return export_with_reference(tiny_llama, root / "awq", root / "reference", AWQPacker(128), quantize)


@pytest.mark.slow
def test_tiny_llama_matches_its_dequantized_twin(exported):
    quantized, reference = exported
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    assert (engine_last_logits(quantized, PROMPTS) - engine_last_logits(reference, PROMPTS)).abs().max() < 1e-4
    assert greedy_tokens(quantized) == greedy_tokens(reference)


@pytest.mark.slow
def test_tiny_llama_tp2_equals_tp1(exported):
    """Spawned ranks; rank 1's down_proj starts inside a group (the GPTQ-layout conversion)."""
    quantized, _ = exported
    assert greedy_tokens(quantized, tp=2) == greedy_tokens(quantized)
