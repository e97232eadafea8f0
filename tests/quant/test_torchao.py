"""torchao safetensors checkpoints, written through torchao's own flattening (the names and header
metadata transformers' TorchAoConfig saves): Int8Tensor (per row, per group, asymmetric),
Float8Tensor (per row, per tensor), Int4Tensor (plain) and the tinygemm tile-packed layout. Every
rank's weight at TP 1-4 equals the slice of the package's dequantization bit for bit (bfloat16, its
dtype); the fused matmul matches the exact float64 weight; bad input is named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from parallel.sharding import column_shard, qkv_shard, row_shard
from quant import QuantConfigError, get_loader
from quant.base import KernelLinear
from quant.common.float_zero import FloatZeroLinear
from quant.torchao import tile_packed
from tests.quant.checkpoints import CountingWeights

torchao = pytest.importorskip("torchao", reason="the torchao package makes the test checkpoints")
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict  # noqa: E402
from torchao.quantization import MappingType, PerGroup, PerRow, PerTensor  # noqa: E402
from torchao.quantization.quant_primitives import (_choose_qparams_affine_tinygemm,  # noqa: E402
                                                   _dequantize_affine_tinygemm, _quantize_affine_tinygemm)
from torchao.quantization.quantize_.workflows import Float8Tensor, Int4Tensor, Int8Tensor  # noqa: E402
from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (  # noqa: E402
    Int4TilePackedTo4dTensor)
from torchao.quantization.utils import pack_tinygemm_scales_and_zeros  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = torch.bfloat16


def ao_config(type_name: str, **data) -> dict:
    return {"quant_method": "torchao", "quant_type": {"default": {"_type": type_name, "_version": 2, "_data": data}},
            "modules_to_not_convert": None}


def save(path: Path, weights: dict) -> Path:
    """weights: name -> tensor subclass or plain tensor, written as transformers writes them."""
    data, metadata = flatten_tensor_state_dict(weights)
    path.mkdir(parents=True, exist_ok=True)
    save_file(data, str(path / "model.safetensors"), metadata=metadata)
    return path


def int4_plain(w: torch.Tensor, gs: int) -> Int4Tensor:
    """Int4Tensor as fbgemm's int4_row_quantize_zp makes it (min/max per group, q in [-8, 7],
    w = q * scale + zero), built by hand: its quantizer needs the CUDA package mslk."""
    n, k = w.shape
    g = w.float().reshape(n, k // gs, gs)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo).clamp(min=1e-6) / 15
    zero = lo + scale * 8
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15) - 8
    q = q.reshape(n, k).to(torch.int8)
    packed = ((q[:, 1::2] << 4) | (q[:, ::2] & 15)).to(torch.int8)  # column 2j in the low nibble
    return Int4Tensor(packed, scale.T.contiguous().to(BF16), zero.T.contiguous().to(BF16), [1, gs], [n, k])


def int4_plain_dequant(t: Int4Tensor) -> torch.Tensor:
    """w = q * scale + zero_point, in float32 (fbgemm's formula; Int4Tensor has no CPU dequantize)."""
    b = t.qdata
    q = torch.stack([(b << 4) >> 4, b >> 4], -1).reshape(b.shape[0], -1).float()
    gs = t.block_size[-1]
    return q * t.scale.float().T.repeat_interleave(gs, 1) + t.zero_point.float().T.repeat_interleave(gs, 1)


def int4_tile(w: torch.Tensor, gs: int):
    """Int4TilePackedTo4dTensor from torchao's own tinygemm quantization (CPU), packed by hand
    into the tile layout (its packer is a CUDA op; checked against it in the cuda test below)."""
    n, k = w.shape
    kp, np_ = -(-k // 1024) * 1024, -(-n // 8) * 8
    wp = torch.nn.functional.pad(w.to(BF16), (0, kp - k, 0, np_ - n))
    scale, zero = _choose_qparams_affine_tinygemm(wp, MappingType.ASYMMETRIC, (1, gs), torch.int32, 0, 15,
                                                  scale_dtype=BF16, zero_point_dtype=BF16)
    codes = _quantize_affine_tinygemm(wp, (1, gs), scale, zero, torch.int32, 0, 15)
    scale, zero = scale.reshape(np_, -1), zero.reshape(np_, -1)
    t = Int4TilePackedTo4dTensor(tile_packed.encode(codes), pack_tinygemm_scales_and_zeros(scale, zero, BF16),
                                 [1, gs], [n, k])
    deq = _dequantize_affine_tinygemm(codes, (1, gs), scale, zero, torch.int32, 0, 15, output_dtype=BF16)
    return t, codes[:n, :k], deq[:n, :k].float()


def shards(n, k, tp):
    for r in range(tp):
        yield "column", column_shard([("l", n)], k, r, tp)
        yield "row", row_shard("l", k, n, r, tp)


def rank_slice(full: torch.Tensor, kind: str, shard) -> torch.Tensor:
    if kind == "column":
        b = shard.blocks[0]
        return full[b.start:b.stop]
    return full[:, shard.k_start:shard.k_stop]


def check_all_ranks(path, config, full_bf16, exact, n, k, want_type, tps=(1, 2, 3, 4)):
    loader = get_loader(config)
    gen = torch.Generator().manual_seed(0)
    for tp in tps:
        for kind, shard in shards(n, k, tp):
            linear = loader.load_linear(CountingWeights(path, dtype=torch.float32), shard)
            assert isinstance(linear, want_type), type(linear)
            assert torch.equal(linear.dequantize().to(BF16).float(), rank_slice(full_bf16, kind, shard).float())
            x = torch.randn(2, shard.local_in_features, generator=gen)
            ref = x.double() @ rank_slice(exact, kind, shard).T
            assert (linear(x).double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    return loader


@pytest.mark.parametrize("case", ["int8-row", "int8-group32", "int8-asym", "float8-row", "float8-tensor"])
def test_8bit_ranks_equal_the_package_dequantization(tmp_path, case):
    n, k = 96, 192
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05).to(BF16)
    if case.startswith("int8"):
        gran = PerGroup(32) if case == "int8-group32" else PerRow()
        mapping = MappingType.ASYMMETRIC if case == "int8-asym" else MappingType.SYMMETRIC
        t = Int8Tensor.from_hp(w, gran, mapping_type=mapping)
        data = {"granularity": {"_type": "PerGroup", "_data": {"group_size": 32}}} if case == "int8-group32" else {}
        config = ao_config("Int8WeightOnlyConfig", **data)
        exact = (t.qdata.double() - t.zero_point.double().repeat_interleave(k // t.scale.shape[1], 1)) * \
            t.scale.double().repeat_interleave(k // t.scale.shape[1], 1)
        assert bool(t.zero_point.any()) == (case == "int8-asym")
    else:
        t = Float8Tensor.from_hp(w, granularity=PerTensor() if case == "float8-tensor" else PerRow())
        config = ao_config("Float8WeightOnlyConfig", granularity={"_type": "PerTensor" if case == "float8-tensor"
                                                                  else "PerRow", "_data": {}})
        exact = t.qdata.double() * t.scale.double()
    path = save(tmp_path, {"l.weight": t})
    assert json.loads(__import__("safetensors").safe_open(str(path / "model.safetensors"), "pt").metadata()
                      ["l.weight"])["_type"] == type(t).__name__
    check_all_ranks(path, config, t.dequantize(), exact, n, k, KernelLinear)


@pytest.mark.parametrize("gs", [32, 64])
def test_int4_plain_ranks_equal_the_format(tmp_path, gs):
    n, k = 96, 192  # gs 64: the TP=3 / 4 row boundaries (64, 48) are on / inside groups
    t = int4_plain(torch.randn(n, k, generator=torch.Generator().manual_seed(gs)) * 0.05, gs)
    path = save(tmp_path, {"l.weight": t})
    full = int4_plain_dequant(t)
    check_all_ranks(path, ao_config("Int4WeightOnlyConfig", group_size=gs, int4_packing_format="plain"),
                    full.to(BF16), full.double(), n, k, FloatZeroLinear)
    # the rank's linear is exact to the format in float32, not only in bfloat16
    linear = get_loader(ao_config("Int4WeightOnlyConfig", group_size=gs)).load_linear(
        CountingWeights(path, dtype=torch.float32), row_shard("l", k, n, 1, 4))
    assert torch.equal(linear.dequantize(), full[:, 48:96])


@pytest.mark.parametrize("gs", [32, 128])
def test_tile_packed_ranks_equal_torchaos_tinygemm_dequantization(tmp_path, gs):
    n, k = 96, 384  # padded to [96, 1024]: qdata [12, 8, 32, 4]; TP=4 row ranks start inside tiles
    t, codes, full = int4_tile(torch.randn(n, k, generator=torch.Generator().manual_seed(gs)) * 0.05, gs)
    assert list(t.qdata.shape) == [12, 8, 32, 4] and torch.equal(tile_packed.decode(t.qdata)[:n, :k], codes)
    path = save(tmp_path, {"l.weight": t})
    s, z = (t.scale_and_zero[..., i].double().T.repeat_interleave(gs, 1)[:n, :k] for i in (0, 1))
    exact = (codes.double() - 8) * s + z
    config = ao_config("Int4WeightOnlyConfig", group_size=gs, int4_packing_format="tile_packed_to_4d")
    check_all_ranks(path, config, full.to(BF16), exact, n, k, FloatZeroLinear)
    # a column rank reads the tiles of its rows only: TP=4 rank 1 has rows 24..48 = n-tiles 3..6 of 12
    w = CountingWeights(path, dtype=torch.float32)
    get_loader(config).load_linear(w, column_shard([("l", n)], k, 1, 4))
    # 3 of the 12 n-tiles x 3 of the 8 k-tiles (K = 384 of the padded 1024), int32 words
    assert w.read_by_name["l._weight_qdata"] == t.qdata.numel() * 4 * 3 // 12 * 3 // 8


def test_transformers_checkpoint_fused_layers_and_float_head(tmp_path):
    """A tiny Llama quantized and saved by transformers' TorchAoConfig (Int8WeightOnlyConfig):
    fused q/k/v and gate/up at TP 1-4 equal the package's per-layer dequantization; lm_head float."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from transformers import AutoModelForCausalLM, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from tests.quant.checkpoints import write_tiny_llama

    src = write_tiny_llama(tmp_path / "float", hidden=128, heads=4, kv_heads=2, intermediate=384, layers=1,
                           vocab=256)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
                                                 dtype=BF16)
    model.save_pretrained(tmp_path / "ao")
    config = json.loads((tmp_path / "ao" / "config.json").read_text())["quantization_config"]
    with safe_open(str(tmp_path / "ao" / "model.safetensors"), "pt") as f:
        tensors, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    full = {name[: -len(".weight")]: t.dequantize() for name, t in unflatten_tensor_state_dict(tensors, meta)[0].items()
            if hasattr(t, "dequantize") and name.endswith("proj.weight")}
    loader = get_loader(config)
    p = "model.layers.0"
    for tp in (1, 2, 4):
        for r in range(tp):
            w = CountingWeights(tmp_path / "ao", dtype=torch.float32)
            for shard in (qkv_shard([f"{p}.self_attn.{x}_proj" for x in "qkv"], 128, 4, 2, 32, r, tp),
                          column_shard([(f"{p}.mlp.gate_proj", 384), (f"{p}.mlp.up_proj", 384)], 128, r, tp)):
                want = torch.cat([full[b.source][b.offset + b.start: b.offset + b.stop] for b in shard.blocks])
                assert torch.equal(loader.load_linear(w, shard).dequantize().to(BF16), want)
            head = loader.load_linear(w, column_shard([("lm_head", 256)], 128, r, tp))
            assert torch.equal(head.dequantize(), tensors["lm_head.weight"].float()[r * 256 // tp:(r + 1) * 256 // tp])


@pytest.mark.parametrize("config,message", [
    (ao_config("Int4DynamicActivationInt4WeightConfig"), r"_type='Int4DynamicActivationInt4WeightConfig' is not "
                                                         r"supported; supported: Int8WeightOnlyConfig"),
    (ao_config("Int4WeightOnlyConfig", int4_packing_format="preshuffled"), r"int4_packing_format='preshuffled' is "
                                                                           r"not supported; supported: plain"),
    (ao_config("Int4WeightOnlyConfig", group_size=0), r"group_size=0 must be a positive integer"),
    (ao_config("Float8WeightOnlyConfig", granularity={"_type": "PerBlock", "_data": {}}),
     r"granularity='PerBlock' is not supported for Float8WeightOnlyConfig"),
    ({"quant_method": "torchao", "quant_type": "int4_weight_only"}, r"quant_type='int4_weight_only' is a legacy name"),
    ({"quant_method": "torchao", "quant_type": {"model.layers.0": {}}}, r"must be \{'default': config\}"),
])
def test_bad_configs_name_the_field(config, message):
    with pytest.raises(QuantConfigError, match=message):
        get_loader(config)


def test_bad_tensors_name_the_tensor(tmp_path):
    t = Int8Tensor.from_hp((torch.randn(32, 64) * 0.05).to(BF16), PerRow())
    data, metadata = flatten_tensor_state_dict({"l.weight": t})
    shard = column_shard([("l", 32)], 64, 0, 1)
    int8 = ao_config("Int8WeightOnlyConfig")
    cases = [
        ({k: v for k, v in data.items() if k != "l._weight_scale"}, int8,
         r"tensor l._weight_scale is missing from the torchao checkpoint"),
        ({**data, "l._weight_qdata": data["l._weight_qdata"].to(torch.int32)}, int8,
         r"tensor l._weight_qdata has dtype torch.int32; the config's int8 stores torch.int8"),
        ({**data, "l._weight_scale": data["l._weight_scale"][:16]}, int8, r"tensor l._weight_zero_point has shape"),
        (data, ao_config("Int8WeightOnlyConfig", granularity={"_type": "PerGroup", "_data": {"group_size": 16}}),
         r"tensor l._weight_scale holds groups of 64 columns but the quantization_config says group_size=16"),
        ({k: v for k, v in data.items() if k != "l._weight_qdata"}, int8,
         r"tensor l._weight_qdata is missing from the torchao checkpoint \(and there is no float l.weight"),
    ]
    for i, (tensors, config, message) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        save_file(tensors, str(tmp_path / str(i) / "model.safetensors"), metadata=metadata)
        with pytest.raises(QuantConfigError, match=message):
            get_loader(config).load_linear(CountingWeights(tmp_path / str(i), dtype=torch.float32), shard)


@pytest.mark.cuda
def test_tile_layout_is_torchs_cuda_packing_and_tinygemm_dequantization():
    """The decoder's facts against torch's own CUDA ops: _convert_weight_to_int4pack packs the
    same words as tile_packed.encode, and _weight_int4pack_mm against the identity gives
    (u - 8) * scale + zero."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    n, k, gs = 64, 1024, 128
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs.cuda(), 8).cpu()
    assert torch.equal(packed, tile_packed.encode(codes))
    assert torch.equal(tile_packed.decode(packed), codes)
    scale = (torch.rand(k // gs, n) * 0.01 + 0.001).to(BF16)
    zero = (torch.randn(k // gs, n) * 0.01).to(BF16)
    sz = torch.stack([scale, zero], -1).cuda()
    eye = torch.eye(k, dtype=BF16, device="cuda")
    w = torch.ops.aten._weight_int4pack_mm(eye, packed.cuda(), gs, sz).T.float().cpu()  # [n, k]
    ref = (codes.float() - 8) * scale.float().T.repeat_interleave(gs, 1) + zero.float().T.repeat_interleave(gs, 1)
    assert (w - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


# -- the default model in torchao formats, end to end ------------------------------------------


@pytest.mark.slow
# int8 maps onto the same int8 kernel the int8 formats' default-model runs cover: QSHARD_ALL_FORMATS=1 only
@pytest.mark.parametrize("kind", [pytest.param("int8", marks=pytest.mark.skipif(
    os.environ.get("QSHARD_ALL_FORMATS") != "1", reason="QSHARD_ALL_FORMATS=1 runs it")), "int4-tile-packed"])
def test_default_model_tp3_equals_tp1_and_transformers(default_model_dir, tmp_path, kind):
    """SmolLM2 as Int8WeightOnlyConfig (quantized and saved by transformers' TorchAoConfig) and as
    tinygemm tile-packed int4, group 64 (torchao's tinygemm quantization, tiles packed here): qshard
    TP=3 tokens == TP=1; logits vs transformers on the twin decoded in float32 from the stored
    tensors (Int8Tensor.dequantize for int8)."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from transformers import AutoModelForCausalLM, TorchAoConfig
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    from tests.quant import package_e2e

    path = tmp_path / kind
    if kind == "int8":
        model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32,
                                                     quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
        model.save_pretrained(path)
        del model
        package_e2e.copy_tokenizer(default_model_dir, path)

        def twin():
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                subclasses, _ = unflatten_tensor_state_dict({n: f.get_tensor(n) for n in f.keys()}, f.metadata())
            return {n: t.dequantize(torch.float32) for n, t in subclasses.items() if isinstance(t, Int8Tensor)}
    else:
        weights, twin = {}, {}
        for name, t in package_e2e.float_tensors(default_model_dir).items():
            if not package_e2e.is_linear(name):
                weights[name] = t
                continue
            sub, codes, _ = int4_tile(t, 64)
            weights[name] = sub
            n, k = t.shape
            s, z = (sub.scale_and_zero[..., i].float().T.repeat_interleave(64, 1)[:n, :k] for i in (0, 1))
            twin[name] = (codes.float() - 8) * s + z
        data, metadata = flatten_tensor_state_dict(weights)
        config = TorchAoConfig(Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")).to_dict()
        package_e2e.write_checkpoint(default_model_dir, path, data, config, metadata)
    package_e2e.check(f"torchao {kind}", package_e2e.run(default_model_dir, path, twin))
