"""GPTQ: the packer (against GPTQModel's packing), the loader's v1/v2 detection and overflow
report, bad input, misaligned shards, and a tiny Llama end to end against its dequantized twin."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from engine.weights import Weights
from kernels.layouts import GPTQLayout
from parallel.sharding import column_shard, qkv_shard, row_shard
from quant import QuantConfigError, get_loader
from quant.calibrate import QuantArgs, QuantResult, gptq_quantize, rtn_quantize
from quant.gptq.packer import GPTQPacker
from quant.common.dense import DenseLinear
from tests.helpers import engine_last_logits
from tests.quant.checkpoints import (PROMPTS, export_with_reference, expected_slice, gptq_tensors, greedy_tokens,
                                     random_result, save_checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw):
    return {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "checkpoint_format": "gptq_v2", **kw}


def _load(path, config, shard, dtype=torch.float32):
    return get_loader(config).load_linear(Weights(path, dtype=dtype), shard)


def _layout(linear) -> GPTQLayout:
    return linear.prepared.layout


# -- the packer ----------------------------------------------------------------------------------

# Packed by GPTQModel 7.7.0's `pack_original` (run from its sdist, v2 / true zeros): the layer of
# `_golden_result`. First two qweight columns and first three qzeros words.
GPTQMODEL_GOLDEN = {
    2: ([[1819044972, 454761243], [1819044972, 454761243]], [[57]]),
    3: ([[-1205220424, 1402433619], [-877123125, 1884526448], [701216809, -1754246249]],
        [[-241348367, 1358011728, -1655639651]]),
    4: ([[440163952, 1299153315], [-1833642248, -974714581], [440163952, 1299153315], [-1833642248, -974714581]],
        [[2913]]),
    8: ([[353240832, 403769859], [824845084, 875374111], [1296449336, 1346978363], [1768053588, 1818582615],
         [-2055309456, -2004780429], [-1583705204, -1533176177], [-1112100952, -1061571925],
         [-640496700, -589967673]], [[269157889]]),
}


def _golden_result(bits: int) -> QuantResult:
    n, k = (32 if bits == 3 else 4), 32
    codes = ((torch.arange(n)[:, None] * 3 + torch.arange(k)[None, :] * 7) % (1 << bits)).int()
    zeros = ((torch.arange(n)[:, None] * 5 + 1) % (1 << bits)).int()
    return QuantResult(codes, torch.ones(n, 1), zeros, torch.zeros(k, dtype=torch.int32), k, bits, False, 0.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packer_matches_gptqmodel(bits):
    out = GPTQPacker(bits, -1, sym=False, checkpoint_format="gptq_v2").pack("x", _golden_result(bits), torch.float16)
    qweight, qzeros = GPTQMODEL_GOLDEN[bits]
    assert out["x.qweight"][:, :2].tolist() == qweight
    assert out["x.qzeros"][:, :3].tolist() == qzeros


def test_v1_symmetric_stores_sevens():
    r = random_result(16, 64, 4, 32, sym=True)
    v1 = GPTQPacker(4, 32, sym=True, checkpoint_format="gptq").pack("x", r, torch.float16)
    v2 = GPTQPacker(4, 32, sym=True, checkpoint_format="gptq_v2").pack("x", r, torch.float16)
    assert (v1["x.qzeros"] == 0x77777777).all()
    assert (v2["x.qzeros"].view(torch.uint32).to(torch.int64) == 0x88888888).all()
    assert v1["x.qweight"].dtype == torch.int32 and list(v1["x.qweight"].shape) == [8, 16]
    assert list(v1["x.scales"].shape) == [2, 16] and v1["x.scales"].dtype == torch.float16
    assert torch.equal(v1["x.g_idx"], torch.arange(64, dtype=torch.int32) // 32)


def test_packer_refuses_asymmetric_v1():
    with pytest.raises(ValueError, match=r"z - 1.*z = 0.*gptq_v2"):
        GPTQPacker(4, 128, sym=False, checkpoint_format="gptq")


def test_packer_refuses_a_result_it_does_not_describe():
    with pytest.raises(ValueError, match=r"layer: quantized with bits=8"):
        GPTQPacker(4, 32).pack("layer", random_result(8, 64, 8, 32, sym=True), torch.float16)


def test_packer_configs():
    packer = GPTQPacker(3, 64, sym=False, checkpoint_format="gptq_v2")
    packer.pack("a", random_result(8, 128, 3, 64, sym=False), torch.float16)
    assert packer.quantization_config()["desc_act"] is False
    packer.pack("b", random_result(8, 128, 3, 64, sym=False, act_order=True), torch.float16)
    qc = packer.quantization_config()
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format",
                               "format")} == {"quant_method": "gptq", "bits": 3, "group_size": 64, "desc_act": True,
                                              "sym": False, "checkpoint_format": "gptq_v2", "format": "gptq_v2"}
    (name, text), = packer.extra_files()
    assert name == "quantize_config.json"
    assert json.loads(text)["checkpoint_format"] == "gptq_v2" and json.loads(text)["desc_act"] is True


@pytest.mark.parametrize("version, sym", [("gptq", True), ("gptq_v2", True), ("gptq_v2", False)])
@pytest.mark.parametrize("bits", [3, 8])
def test_packer_round_trip(tmp_path, bits, version, sym):
    r = random_result(40, 96, bits, 32, sym=sym, act_order=True)
    save_checkpoint(tmp_path, GPTQPacker(bits, 32, sym, version).pack("x", r, torch.float16))
    lin = _load(tmp_path, _config(bits=bits, sym=sym, checkpoint_format=version), column_shard([("x", 40)], 96, 0, 1))
    assert torch.equal(lin.dequantize(), r.dequantize())


# -- v1 / v2 detection ---------------------------------------------------------------------------


@pytest.mark.parametrize("stored, declared", [("gptq_v2", "gptq"), ("gptq", "gptq_v2"), ("gptq", None),
                                              ("gptq_v2", None)])
def test_symmetric_zeros_decide_the_format(tmp_path, caplog, stored, declared):
    r = random_result(24, 64, 4, 32, sym=True)
    save_checkpoint(tmp_path, gptq_tensors("x", r, stored))
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32}  # sym silent: GPTQ's default is sym
    if declared:
        config["checkpoint_format"] = declared
    with caplog.at_level(logging.INFO, logger="quant.gptq"):
        lin = _load(tmp_path, config, column_shard([("x", 24)], 64, 0, 1))
    assert torch.equal(lin.dequantize(), r.dequantize())
    assert _layout(lin).qzeros is None  # symmetric: no zero table for the kernels
    assert f"read as {stored}, symmetric" in caplog.text
    assert ("WARNING" in caplog.text) == (declared is not None and declared != stored)


def test_tgi_tensors_without_gptq_sym_mean_asymmetric(tmp_path):
    r = random_result(24, 64, 4, 16, sym=False, min_zero=1)
    tensors = gptq_tensors("x", r, "gptq")
    tensors.update(gptq_bits=torch.tensor([4]), gptq_groupsize=torch.tensor([16]))
    save_checkpoint(tmp_path, tensors)
    # quantize_config.json of such checkpoints may say little; the tensors decide (as in TGI)
    loader = get_loader({"quant_method": "gptq", "sym": True})
    lin = loader.load_linear(Weights(tmp_path), column_shard([("x", 24)], 64, 0, 1))
    assert torch.equal(lin.dequantize(), r.dequantize())
    assert loader.params(Weights(tmp_path)).sym is False and "group_size=16" in loader.describe()


def test_tgi_gptq_sym_tensor(tmp_path):
    r = random_result(24, 64, 2, 32, sym=True)
    tensors = gptq_tensors("x", r, "gptq")
    tensors.update(gptq_bits=torch.tensor([2]), gptq_groupsize=torch.tensor([32]), gptq_sym=torch.tensor([True]))
    save_checkpoint(tmp_path, tensors)
    lin = _load(tmp_path, {"quant_method": "gptq"}, column_shard([("x", 24)], 64, 0, 1))
    assert torch.equal(lin.dequantize(), r.dequantize()) and _layout(lin).qzeros is None


def _buggy_v1_qzeros(zeros_gn: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric v1 packing as buggy packers did it: z - 1 cast to uint32 and OR-ed in at its
    shift, so z = 0 puts 0xFFFFFFFF << shift into the word (its field and every higher one)."""
    z = (zeros_gn.numpy().astype(np.int64) - 1).astype(np.uint32)
    per = 32 // bits
    words = np.zeros((z.shape[0], -(-z.shape[1] // per)), dtype=np.uint32)
    for col in range(words.shape[1]):
        for j in range(min(per, z.shape[1] - col * per)):
            words[:, col] |= z[:, col * per + j] << np.uint32(bits * j)
    return torch.from_numpy(words.view(np.int32))


def test_overflowed_v1_zeros_are_reported_with_every_layer(tmp_path):
    tensors = {}
    layers = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    for i, name in enumerate(layers):
        r = random_result(16, 64, 4, 32, sym=False, min_zero=1, seed=i)
        if i < 2:
            r.zeros[3, 1] = 0  # a zero point of 0: v1 cannot store it
        tensors.update(gptq_tensors(name, r, "gptq_v2"))
        tensors[f"{name}.qzeros"] = _buggy_v1_qzeros(r.zeros.T.contiguous(), 4)
    save_checkpoint(tmp_path, tensors)
    config = _config(checkpoint_format="gptq")
    with pytest.raises(QuantConfigError) as e:
        _load(tmp_path, config, column_shard([(layers[1], 16)], 64, 0, 1))
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj" in msg and "model.layers.0.mlp.gate_proj" in msg
    assert "model.layers.1.mlp.up_proj" not in msg and "2 layer(s)" in msg and "z = 16" in msg
    assert "gptq_v2" in msg
    # a layer without overflow still loads
    assert _load(tmp_path, config, column_shard([(layers[2], 16)], 64, 0, 1)).dequantize().shape == (16, 64)


def test_v1_zero_of_zero_clamped_is_only_warned(tmp_path, caplog):
    """The 'reset to 1' variant stores a legal v1 value: it reads as z = 1, with a warning."""
    r = random_result(16, 64, 4, 32, sym=False, min_zero=1)
    r.zeros[0, 0] = 1
    save_checkpoint(tmp_path, gptq_tensors("x", r, "gptq"))
    with caplog.at_level(logging.WARNING, logger="quant.gptq"):
        lin = _load(tmp_path, _config(checkpoint_format="gptq"), column_shard([("x", 16)], 64, 0, 1))
    assert torch.equal(lin.dequantize(), r.dequantize())
    assert "cannot be detected" in caplog.text


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, match", [
    ("bits", 5, r"bits=5 is not supported; supported: 2, 3, 4, 8"),
    ("group_size", 0, r"group_size=0 is invalid"),
    ("checkpoint_format", "marlin", r"checkpoint_format='marlin' \(repacked for another kernel\).*gptq, gptq_v2"),
    ("sym", "yes", r"sym='yes' must be true or false"),
])
def test_bad_config(field, value, match):
    with pytest.raises(QuantConfigError, match=match):
        get_loader(_config(**{field: value}))


def test_unknown_quant_method_lists_supported():
    with pytest.raises(QuantConfigError, match=r"unsupported quant_method 'gptq-x'; supported: .*awq.*gptq"):
        get_loader({"quant_method": "gptq-x"})


def _one_layer(tmp_path, r, **kw):
    save_checkpoint(tmp_path, gptq_tensors("x", r, "gptq_v2", **kw))
    return tmp_path


def test_group_size_not_dividing_in_features(tmp_path):
    path = _one_layer(tmp_path, random_result(8, 96, 4, 32, sym=False))
    with pytest.raises(QuantConfigError, match=r"group_size=64 does not divide in_features=96 of layer x"):
        _load(path, _config(group_size=64), column_shard([("x", 8)], 96, 0, 1))


def test_qweight_shape_disagreeing_with_config(tmp_path):
    path = _one_layer(tmp_path, random_result(8, 64, 8, 32, sym=False))
    with pytest.raises(QuantConfigError, match=r"tensor x.qweight has shape \[16, 8\], expected \[8, 8\] for bits=4.*"
                                                r"fits bits=8"):
        _load(path, _config(bits=4), column_shard([("x", 8)], 64, 0, 1))


def test_g_idx_out_of_range(tmp_path):
    r = random_result(8, 64, 4, 32, sym=False, act_order=True)
    r.g_idx[5] = 2
    path = _one_layer(tmp_path, r)
    with pytest.raises(QuantConfigError, match=r"tensor x.g_idx holds group ids in \[0, 2\], outside \[0, 2\)"):
        _load(path, _config(), row_shard("x", 64, 8, 0, 2))


def test_scales_missing(tmp_path):
    tensors = gptq_tensors("x", random_result(8, 64, 4, 32, sym=False), "gptq_v2")
    del tensors["x.scales"]
    save_checkpoint(tmp_path, tensors)
    with pytest.raises(QuantConfigError, match=r"tensor x.scales is missing from the gptq checkpoint"):
        _load(tmp_path, _config(), column_shard([("x", 8)], 64, 0, 1))


def test_desc_act_without_g_idx(tmp_path):
    path = _one_layer(tmp_path, random_result(8, 64, 4, 32, sym=False), with_g_idx=False)
    with pytest.raises(QuantConfigError, match=r"desc_act=true but tensor x.g_idx is missing"):
        _load(path, _config(desc_act=True), column_shard([("x", 8)], 64, 0, 1))


def test_fused_parts_must_share_g_idx(tmp_path):
    tensors = {}
    for i, name in enumerate("qkv"):
        tensors.update(gptq_tensors(name, random_result(8, 64, 4, 32, sym=False, act_order=True, seed=i), "gptq_v2"))
    save_checkpoint(tmp_path, tensors)
    with pytest.raises(QuantConfigError, match=r"tensor k.g_idx differs from q.g_idx"):
        _load(tmp_path, _config(), qkv_shard(["q", "k", "v"], 64, 2, 2, 4, 0, 1))


# -- layers left in float, act-order, misaligned shards ----------------------------------------------


def test_layer_without_qweight_loads_dense(tmp_path):
    w = torch.randn(12, 64)
    save_checkpoint(tmp_path, {"lm_head.weight": w})
    lin = _load(tmp_path, _config(), column_shard([("lm_head", 12)], 64, 1, 2))
    assert isinstance(lin, DenseLinear) and torch.equal(lin.dequantize(), w[6:])


def test_act_order_is_decided_from_the_whole_g_idx(tmp_path):
    """Rank 1's half of this g_idx is trivial after rebasing; act-order must still hold there."""
    r = random_result(8, 256, 4, 32, sym=False)
    r.g_idx[:128] = r.g_idx[:128][torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    path = _one_layer(tmp_path, r)
    for rank in range(2):
        shard = row_shard("x", 256, 8, rank, 2)
        lin = _load(path, _config(), shard)
        assert torch.equal(lin.dequantize(), expected_slice({"x": r.dequantize()}, shard))
        assert _layout(lin).num_groups == 8 and int(_layout(lin).g_idx.min()) == 4 * rank  # whole table, absolute


@pytest.mark.parametrize("act", [False, True])
def test_intermediate_1152_group_128_at_tp2(tmp_path, act):
    """down_proj of the issue: 576 rows per rank = 4.5 groups; loads exactly, never refused."""
    r = random_result(64, 1152, 4, 128, sym=False, act_order=act)
    path = _one_layer(tmp_path, r)
    for tp in (2, 3):
        for rank in range(tp):
            shard = row_shard("x", 1152, 64, rank, tp)
            lin = _load(path, _config(group_size=128), shard)
            assert torch.equal(lin.dequantize(), expected_slice({"x": r.dequantize()}, shard))
    layout = _layout(_load(path, _config(group_size=128), row_shard("x", 1152, 64, 1, 2)))
    if act:
        assert layout.num_groups == 9
    else:  # groups 4..8 (group 4 straddles ranks 0 and 1), ids rebased to 0..4
        assert layout.num_groups == 5 and layout.g_idx[0] == 0 and layout.g_idx[64] == 1 and layout.g_idx[-1] == 4


# -- end to end ------------------------------------------------------------------------------------

def _hessian(prefix: str, in_features: int) -> torch.Tensor:
    """A random Hessian per (layer, input): q/k/v share one, gate/up one, so fused parts share g_idx."""
    layer, module = prefix.split(".")[2], prefix.rsplit(".", 1)[1]
    kind = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}[module]
    gen = torch.Generator().manual_seed(int(layer) * 10 + kind)
    x = torch.randn(64, in_features, generator=gen) * (0.2 + 2 * torch.rand(in_features, generator=gen))
    return x.T @ x / 64


def _quantize(kind: str):
    if kind == "v1-sym":
        return GPTQPacker(4, 128, sym=True, checkpoint_format="gptq"), \
            lambda prefix, w: rtn_quantize(w, QuantArgs(bits=4, group_size=128, sym=True))
    args = QuantArgs(bits=4, group_size=128, sym=False, actorder="group")
    return GPTQPacker(4, 128, sym=False, checkpoint_format="gptq_v2"), \
        lambda prefix, w: gptq_quantize(w, _hessian(prefix, w.shape[1]), args, name=prefix)


@pytest.fixture(scope="module")
def export(tiny_llama, tmp_path_factory):
    """kind -> (quantized checkpoint, float checkpoint of its dequantized weights), made once."""
    made = {}

    def get(kind: str):
        if kind not in made:
            packer, quantize = _quantize(kind)
            root = tmp_path_factory.mktemp(kind)
            made[kind] = export_with_reference(tiny_llama, root / "gptq", root / "reference", packer, quantize)
        return made[kind]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["v1-sym", "v2-asym-actorder"])
def test_tiny_llama_matches_its_dequantized_twin(export, kind):
    quantized, reference = export(kind)
    qc = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and (quantized / "quantize_config.json").exists()
    assert qc["desc_act"] == (kind == "v2-asym-actorder")
    assert (engine_last_logits(quantized, PROMPTS) - engine_last_logits(reference, PROMPTS)).abs().max() < 1e-4
    assert greedy_tokens(quantized) == greedy_tokens(reference)


@pytest.mark.slow
def test_tiny_llama_tp2_equals_tp1(export):
    """Spawned ranks; down_proj's 576 rows per rank are 4.5 act-order groups of 128."""
    quantized, _ = export("v2-asym-actorder")
    assert greedy_tokens(quantized, tp=2) == greedy_tokens(quantized)
