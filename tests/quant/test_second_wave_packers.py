"""Packers of the second-wave formats (bitsandbytes, optimum-quanto, torchao, hqq, vptq), each read
back by its own loader.

- random_tensors: the described tensors, drawn here and saved as safetensors, load at TP=1 with a
  finite weight of std within 25% of the one asked, and every TP=2 rank's weight (column and row
  layouts) equals the TP=1 weight's slice bit for bit.
- pack: a QuantResult (random, and RTN of a Gaussian weight) written and read back dequantizes to
  `QuantResult.dequantize()` bit for bit (scales float16-exact, as a float16 export stores them);
  torchao int4 with bfloat16 scale / zero_point within the zero point's bfloat16 rounding.
- what a format cannot hold is refused by name: nf4 / fp4 (a lookup table), quanto's group size,
  non-power-of-two VPTQ codebooks for random indices.
- engine.dummy: a tiny dummy model of each new QUANTS entry generates through engine.LLM, and
  `qshard write-random` writes it with the dtypes its format fixes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.weights import Weights
from parallel.sharding import column_shard, row_shard
from quant import QuantConfigError, get_loader
from quant.calibrate.args import QuantArgs
from quant.calibrate.rtn import rtn_quantize
from quant.common.random_weights import RandomTensor
from quant.registry import packer_class
from tests.quant.checkpoints import expected_slice, random_result, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

STD = 0.02
N, K = 96, 256  # whole bnb blocks of 64 and quanto / torchao groups per rank at TP=2
PREFIX = "model.layers.0.mlp.down_proj"


def bnb4(quant_type: str) -> dict:
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_quant_storage": "uint8"}


BNB8 = {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True}


def quanto(weights: str) -> dict:
    return {"quant_method": "quanto", "weights": weights, "activations": None, "modules_to_not_convert": ["lm_head"]}


def torchao_int4(gs: int) -> dict:
    return {"quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_version": 2,
                                                                  "_data": {"group_size": gs,
                                                                            "int4_packing_format": "plain"}}}}


def torchao_int8(gs: int | None = None) -> dict:
    granularity = {"_type": "PerRow", "_data": {}} if gs is None else {"_type": "PerGroup", "_data": {"group_size": gs}}
    return {"quant_method": "torchao",
            "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_data": {"granularity": granularity}}}}


def hqq(nbits: int, gs: int) -> dict:
    return {"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits": nbits, "group_size": gs,
                                                                           "axis": 1}}}


def vptq(**layer) -> dict:
    base = {"vector_lens": [-1, 8], "num_centroids": [-1, 256], "num_res_centroids": [-1, 16], "group_num": 2,
            "group_size": 128, "outlier_size": 0, "enable_norm": True, "enable_perm": True, "is_indice_packed": True}
    return {"quant_method": "vptq", "config_for_layers": {}, "shared_layer_config": {"down_proj": {**base, **layer}}}


RANDOM_CASES = {
    "bnb-nf4": bnb4("nf4"), "bnb-fp4": bnb4("fp4"), "bnb-int8": BNB8,
    "quanto-int2": quanto("int2"), "quanto-int4": quanto("int4"), "quanto-int8": quanto("int8"),
    "torchao-int4-g64": torchao_int4(64), "torchao-int8-row": torchao_int8(), "torchao-int8-g32": torchao_int8(32),
    "hqq-1bit-g64": hqq(1, 64), "hqq-2bit-g32": hqq(2, 32), "hqq-3bit-g64": hqq(3, 64), "hqq-4bit-g64": hqq(4, 64),
    "hqq-8bit-g128": hqq(8, 128),
    "vptq-residual-perm-norm": vptq(),
    "vptq-outliers": vptq(vector_lens=[4, 8], num_centroids=[65536, 256], num_res_centroids=[-1, -1], group_num=1,
                          group_size=192, outlier_size=64, enable_norm=False),
}


def materialise(specs: dict[str, RandomTensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Values of each kind quant.common.random_weights describes (floats without a dtype: float16)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in specs.items():
        dtype = spec.dtype or torch.float16
        if spec.kind == "codes":  # every bit random, cut to the stored width as engine.dummy does
            words = torch.randint(-(1 << 31), 1 << 31, spec.shape, generator=gen, dtype=torch.int64).to(torch.int32)
            t = words.to(dtype)
        elif spec.kind == "uniform":
            t = ((torch.rand(spec.shape, generator=gen) * 2 - 1) * spec.value).to(dtype)
        elif spec.kind == "scales":
            t = ((0.75 + 0.5 * torch.rand(spec.shape, generator=gen)) * spec.value).to(dtype)
        elif spec.kind == "ones":
            t = torch.ones(spec.shape, dtype=dtype)
        elif spec.kind == "const":
            t = torch.full(spec.shape, int(spec.value), dtype=dtype)
        elif spec.kind == "group_ids":
            t = (torch.arange(spec.shape[0]) // int(spec.value)).to(dtype)
        else:
            assert spec.kind == "values"
            t = torch.tensor(spec.value, dtype=dtype).reshape(spec.shape)
        out[name] = t
    return out


def tp2_shards(n: int, k: int):
    for rank in range(2):
        yield column_shard([(PREFIX, n)], k, rank, 2)
        yield row_shard(PREFIX, k, n, rank, 2)


def load(loader, weights, n: int = N, k: int = K) -> torch.Tensor:
    return loader.load_linear(weights, column_shard([(PREFIX, n)], k, 0, 1)).dequantize()


@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_random_tensors_load_with_the_asked_std_at_tp1_and_tp2(tmp_path, case):
    config = RANDOM_CASES[case]
    specs = packer_class(config["quant_method"]).for_config(config).random_tensors(PREFIX, N, K, STD)
    weights = Weights(save_checkpoint(tmp_path, materialise(specs)), dtype=torch.float32)
    loader = get_loader(config)
    full = load(loader, weights)
    assert full.shape == (N, K) and bool(torch.isfinite(full).all())
    assert abs(full.std().item() / STD - 1) < 0.25, full.std().item()
    for shard in tp2_shards(N, K):
        assert torch.equal(loader.load_linear(weights, shard).dequantize(), expected_slice({PREFIX: full}, shard))


# -- pack: QuantResult -> the format's tensors -> its loader ---------------------------------------

PACK_CASES = {  # name -> (config, bits, group_size, sym, pack dtype)
    "bnb-int8": (BNB8, 8, -1, True, torch.float16),
    "quanto-int2": (quanto("int2"), 2, 128, False, torch.float16),
    "quanto-int4": (quanto("int4"), 4, 128, False, torch.float16),
    "quanto-int8": (quanto("int8"), 8, -1, True, torch.bfloat16),
    "torchao-int4-g64": (torchao_int4(64), 4, 64, False, torch.float32),
    "torchao-int8-row": (torchao_int8(), 8, -1, False, torch.float16),
    "torchao-int8-g32": (torchao_int8(32), 8, 32, False, torch.float16),
}


def scale_dtype(case: str) -> torch.dtype:
    """Scales exact in this dtype are stored exactly: the pack dtype, float16 for float32 storage
    (where torchao's int4 zero point (8 - z) * s and q * s stay exact products)."""
    dtype = PACK_CASES[case][4]
    return torch.float16 if dtype == torch.float32 else dtype


def packed_weights(tmp_path, case: str, result, dtype=None):
    config, _, _, _, pack_dtype = PACK_CASES[case]
    tensors = packer_class(config["quant_method"]).for_config(config).pack(PREFIX, result, dtype or pack_dtype)
    return get_loader(config), Weights(save_checkpoint(tmp_path, tensors), dtype=torch.float32)


@pytest.mark.parametrize("case", list(PACK_CASES))
def test_pack_reads_back_as_the_quant_result_bit_for_bit(tmp_path, case):
    _, bits, gs, sym, _ = PACK_CASES[case]
    result = random_result(N, K, bits, gs, sym, seed=3)
    result = replace(result, scales=result.scales.to(scale_dtype(case)).float())
    loader, weights = packed_weights(tmp_path, case, result)
    want = result.dequantize()
    assert torch.equal(load(loader, weights), want)
    for shard in tp2_shards(N, K):
        assert torch.equal(loader.load_linear(weights, shard).dequantize(), expected_slice({PREFIX: want}, shard))


@pytest.mark.parametrize("case", list(PACK_CASES))
def test_rtn_of_a_gaussian_weight_reads_back_bit_for_bit(tmp_path, case):
    _, bits, gs, sym, _ = PACK_CASES[case]
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(4)) * STD
    args = QuantArgs(bits=bits, group_size=gs, sym=sym) if gs != -1 else QuantArgs(bits=bits, sym=sym,
                                                                                    strategy="channel")
    result = rtn_quantize(w, args)
    result = replace(result, scales=result.scales.to(scale_dtype(case)).float())  # as the export stores them
    loader, weights = packed_weights(tmp_path, case, result)
    got = load(loader, weights)
    assert torch.equal(got, result.dequantize())
    assert (got - w).abs().max().item() <= result.scales.max().item()  # within one step of the weight


def test_torchao_int4_in_bfloat16_is_exact_but_for_the_zero_points_rounding(tmp_path):
    result = random_result(N, K, 4, 64, sym=False, seed=5)
    result = replace(result, scales=result.scales.bfloat16().float())
    loader, weights = packed_weights(tmp_path, "torchao-int4-g64", result, dtype=torch.bfloat16)
    zero = (8 - result.zeros).float() * result.scales  # stored as bfloat16: 8 bits of mantissa
    err = (load(loader, weights) - result.dequantize()).abs().max().item()
    assert 0 < err <= zero.abs().max().item() * 2 ** -8


def test_formats_that_cannot_hold_a_result_say_why():
    r4 = random_result(N, K, 4, 64, sym=True)
    for quant_type in ("nf4", "fp4"):
        packer = packer_class("bitsandbytes").for_config(bnb4(quant_type))
        with pytest.raises(QuantConfigError, match=f"{PREFIX}: bitsandbytes {quant_type} cannot hold a uniform-code "
                                                   f"quantization exactly: its 4-bit codes index the {quant_type} "
                                                   f"lookup table"):
            packer.pack(PREFIX, r4, torch.float16)
    with pytest.raises(QuantConfigError, match="LLM.int8 is symmetric"):
        packer_class("bitsandbytes").for_config(BNB8).pack(PREFIX, random_result(N, K, 8, -1, sym=False),
                                                           torch.float16)
    with pytest.raises(QuantConfigError, match=r"quanto qint4 stores bits=4, group_size=128 \(quanto's group size "
                                               r"for in_features=256"):
        packer_class("quanto").for_config(quanto("int4")).pack(PREFIX, r4, torch.float16)
    with pytest.raises(QuantConfigError, match="act-order"):
        packer_class("torchao").for_config(torchao_int4(64)).pack(
            PREFIX, random_result(N, K, 4, 64, sym=False, act_order=True), torch.float16)
    with pytest.raises(QuantConfigError, match="num_centroids=200 must be a power of two"):
        packer_class("vptq").for_config(vptq(num_centroids=[-1, 200])).random_tensors(PREFIX, N, K, STD)
    with pytest.raises(QuantConfigError, match="is read but not written"):
        packer_class("torchao").for_config({"quant_method": "torchao", "quant_type": {"default": {
            "_type": "Float8WeightOnlyConfig", "_data": {}}}})


@pytest.mark.parametrize("method,config", [("bitsandbytes", bnb4("nf4")), ("bitsandbytes", BNB8),
                                           ("quanto", quanto("int4")), ("torchao", torchao_int4(64)),
                                           ("torchao", torchao_int8(32)), ("vptq", vptq())])
def test_quantization_config_is_what_the_loader_and_for_config_read(method, config):
    packer = packer_class(method).for_config(config)
    written = packer.quantization_config()
    assert get_loader(written).describe() == get_loader(config).describe()
    again = packer_class(method).for_config(written)
    assert again.random_tensors(PREFIX, N, K, STD) == packer.random_tensors(PREFIX, N, K, STD)


def test_layers_a_config_leaves_float_get_a_float_weight():
    for method, config in (("quanto", quanto("int4")), ("vptq", {**vptq(), "modules_to_not_convert": ["lm_head"]})):
        specs = packer_class(method).for_config(config).random_tensors("lm_head", 512, 256, STD)
        assert list(specs) == ["lm_head.weight"] and specs["lm_head.weight"].kind == "uniform"


# -- engine.dummy: a tiny model of each new format ------------------------------------------------

NEW_QUANTS = ("bnb-nf4", "bnb-int8", "hqq-w4g64", "quanto-int4", "quanto-int8", "torchao-int4-g128", "torchao-int8")


@pytest.mark.parametrize("quant", NEW_QUANTS)
def test_a_tiny_dummy_model_of_each_new_format_generates(tmp_path, quant):
    from engine import LLM, SamplingParams
    from engine.config import ModelConfig
    from engine.dummy import DummyWeights, write_config

    path = write_config("tiny", quant, tmp_path)
    cfg = ModelConfig.from_dir(path)
    weights = DummyWeights(cfg, dtype=torch.bfloat16)  # loaders reading raw get each tensor's own dtype
    loader = get_loader(cfg.quantization_config)
    down = loader.load_linear(weights, column_shard([(PREFIX, 128)], 256, 0, 1)).dequantize()
    assert bool(torch.isfinite(down).all()) and abs(down.std().item() / STD - 1) < 0.25
    with LLM(path, load_format="dummy", dtype="bfloat16", progress=False) as llm:
        outs = llm.generate([[5, 6, 7], [9, 10, 11, 12]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    tokens = [o.token_ids for o in outs]
    assert all(len(t) == 6 for t in tokens) and len({t for seq in tokens for t in seq}) > 2


def test_write_random_keeps_the_dtypes_a_format_fixes(tmp_path):
    """`qshard write-random` writes raw reads: bitsandbytes' absmax stays float32 under --dtype float16."""
    from engine.config import ModelConfig
    from launch.cmd_write_random import write_random

    out = tmp_path / "bnb"
    write_random("tiny", "bnb-nf4", out, dtype="float16", layers=1, progress=False)
    weights = Weights(out, dtype=torch.float16)
    assert weights.get_dtype(f"{PREFIX}.weight.absmax") == torch.float32
    assert weights.get_dtype("model.embed_tokens.weight") == torch.float16
    loader = get_loader(ModelConfig.from_dir(out).quantization_config)
    down = loader.load_linear(weights, column_shard([(PREFIX, 128)], 256, 0, 1)).dequantize()
    assert abs(down.std().item() / STD - 1) < 0.25
