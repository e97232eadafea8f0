"""compressed-tensors pack-quantized: every rank's slice bit for bit across layouts and TP sizes,
checkpoints written by the compressed-tensors package itself, our packer against the package
byte for byte and against transformers' logits, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.weights import Weights
from parallel.sharding import ShardingError, column_shard, qkv_shard, row_shard
from quant import QuantConfigError, get_loader
from quant.calibrate import QuantArgs, QuantResult, rtn_quantize
from quant.compressed_tensors.pack_quantized import FORMAT_VERSION
from quant.compressed_tensors.packer import CompressedTensorsPacker
from quant.compressed_tensors.scheme import CompressedTensorsConfig
from quant.export import export_quantized
from tests.helpers import engine_last_logits, write_hf_llama
from tests.quant.ct_package import package_checkpoint

ct = pytest.importorskip("compressed_tensors")


# Thousands of tiny tensor ops: one intra-op thread (tests/quant/conftest.py); on this shared
# 2-core machine two threads only contend (a 240x192 dequantize: 1 ms vs 70 ms under load).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Synthetic layers: random codes / scales / zeros packed by our packer, one file per quant case

K, HEAD, HEADS = 192, 12, 12
LAYERS = {"col": 120, "gate": 120, "up": 120, "qkv": HEADS * HEAD + 2 * 4 * HEAD, "down": 96,
          **{f"a{kv}.{p}": (HEADS if p == "q" else kv) * HEAD for kv in (4, 2, 1) for p in "qkv"}}
ODD = ("odd", 40, 132)  # K not a multiple of a packed word per rank (channel / tensor cases only)


def quant_args(bits: int, group: int | str, sym: bool, actorder: bool) -> QuantArgs:
    if group == "tensor":
        return QuantArgs(bits=bits, sym=sym, strategy="tensor")
    return QuantArgs(bits=bits, group_size=group, sym=sym, strategy="group", actorder="group" if actorder else "none")


def random_result(gen: torch.Generator, rows: int, cols: int, args: QuantArgs,
                  g_idx: torch.Tensor | None) -> QuantResult:
    size = args.columns_per_group(cols)
    n_groups = 1 if args.strategy == "tensor" else cols // size
    param_rows = 1 if args.strategy == "tensor" else rows
    codes = torch.randint(0, 1 << args.bits, (rows, cols), generator=gen, dtype=torch.int32)
    scales = (torch.rand(param_rows, n_groups, generator=gen) * 0.02 + 1e-3).expand(rows, -1).contiguous()
    zeros = (torch.full((param_rows, n_groups), args.sym_zero, dtype=torch.int32) if args.sym else
             torch.randint(0, 1 << args.bits, (param_rows, n_groups), generator=gen, dtype=torch.int32))
    g = g_idx if g_idx is not None else torch.arange(cols, dtype=torch.int32) // size
    return QuantResult(codes, scales, zeros.expand(rows, -1).contiguous(), g, size, args.bits, args.sym, 0.0)


def write_synthetic(path: Path, args: QuantArgs, layers: dict[str, tuple[int, int]], seed: int = 0,
                    edit=None) -> tuple[Weights, dict, dict[str, torch.Tensor]]:
    """Pack random results of every layer into one safetensors file; returns (weights, config, full W)."""
    gen = torch.Generator().manual_seed(seed)
    packer = CompressedTensorsPacker(args)
    tensors, full, perms = {}, {}, {}
    for prefix, (rows, cols) in layers.items():
        g_idx = None
        if args.actorder == "group":  # one activation order per input size, shared by fused layers
            if cols not in perms:
                order = torch.randperm(cols, generator=gen)
                perms[cols] = (torch.arange(cols, dtype=torch.int32) // args.group_size)[order]
            g_idx = perms[cols]
        result = random_result(gen, rows, cols, args, g_idx)
        full[prefix] = result.dequantize()
        tensors.update(packer.pack(prefix, result, torch.float32))
    if edit:
        edit(tensors)
    save_file(tensors, str(path))
    return Weights(path, dtype=torch.float32), packer.quantization_config(), full


def expected(full: dict[str, torch.Tensor], shard) -> torch.Tensor:
    rows = torch.cat([full[b.source][b.offset + b.start:b.offset + b.stop] for b in shard.blocks])
    return rows[:, shard.k_start:shard.k_stop]


def kv_split_ok(kv: int, tp: int) -> bool:
    return kv % tp == 0 if tp <= kv else tp % kv == 0


def sweep_layouts(with_odd: bool):
    """(name, TP sizes, shard builder) for every way a layer is split."""
    yield "column", (1, 2, 3, 4), lambda tp, r: column_shard([("col", 120)], K, r, tp)
    yield "gate_up", (1, 2, 3, 4), lambda tp, r: column_shard([("gate", 120), ("up", 120)], K, r, tp)
    for kv in (4, 2, 1):  # kv 4: split; kv 2 at TP 4 and kv 1 at TP >= 2: KV heads replicated
        tps = tuple(tp for tp in (1, 2, 3, 4) if kv_split_ok(kv, tp))
        yield f"qkv_kv{kv}", tps, (lambda kv: lambda tp, r: qkv_shard(
            (f"a{kv}.q", f"a{kv}.k", f"a{kv}.v"), K, HEADS, kv, HEAD, r, tp))(kv)
    yield "qkv_stored_fused", (1, 2, 4), lambda tp, r: qkv_shard(("qkv",), K, HEADS, 4, HEAD, r, tp, fused=True)
    yield "row", (1, 2, 3, 4), lambda tp, r: row_shard("down", K, 96, r, tp)
    if with_odd:
        yield "row_odd_k", (1, 2, 3, 4), lambda tp, r: row_shard("odd", ODD[2], ODD[1], r, tp)


SWEEP = ([(b, g, s, a) for b in (4, 8) for s in (True, False)
          for g, a in ((32, False), (32, True), (64, False), (64, True), (-1, False))]
         + [(2, 32, False, True), (2, -1, True, False), (4, "tensor", False, False), (8, "tensor", True, False)])


@pytest.mark.parametrize("bits,group,sym,actorder", SWEEP)
def test_every_rank_slice_is_bit_exact(tmp_path, bits, group, sym, actorder):
    args = quant_args(bits, group, sym, actorder)
    per_channel = group in (-1, "tensor")
    layers = {p: (n, K) for p, n in LAYERS.items()} | ({ODD[0]: ODD[1:]} if per_channel else {})
    weights, config, full = write_synthetic(tmp_path / "model.safetensors", args, layers)
    loader = get_loader(config)
    checked = 0
    for name, tps, build in sweep_layouts(per_channel):
        for tp in tps:
            for rank in range(tp):
                shard = build(tp, rank)
                linear = loader.load_linear(weights, shard)
                got, want = linear.dequantize(), expected(full, shard)
                assert got.shape == want.shape, (name, tp, rank)
                assert torch.equal(got, want), f"{name} TP={tp} rank={rank}: max diff {(got - want).abs().max()}"
                if sym:
                    assert linear.prepared.layout.qzeros is None  # symmetric kernel path
                checked += 1
    assert checked >= 60


def test_misaligned_row_shards_replicate_straddling_groups(tmp_path):
    """K=192, group 64, TP 4: ranks own 48 columns, so groups straddle ranks and are read twice."""
    args = quant_args(4, 64, False, False)
    weights, config, full = write_synthetic(tmp_path / "m.safetensors", args, {"down": (96, K)})
    loader = get_loader(config)
    for rank in range(4):
        shard = row_shard("down", K, 96, rank, 4)
        layout = loader.load_linear(weights, shard).prepared.layout
        first, last = shard.k_start // 64, (shard.k_stop - 1) // 64
        assert layout.scales.shape == (last - first + 1, 96)
        assert (layout.g_idx is not None) == bool(shard.k_start % 64)


def test_legacy_unset_g_idx_means_column_order(tmp_path):
    """Old compressed-tensors stored weight_g_idx = -1 (unset) for actorder 'group' layers it never
    reordered: such a layer is column order."""
    args = quant_args(4, 32, True, True)

    def unset(tensors):
        tensors["down.weight_g_idx"] = torch.full((K,), -1, dtype=torch.int32)

    gen_args = quant_args(4, 32, True, False)
    weights, _, full = write_synthetic(tmp_path / "m.safetensors", gen_args, {"down": (96, K)}, edit=unset)
    loader = get_loader(CompressedTensorsPacker(args).quantization_config())
    for rank in range(3):
        shard = row_shard("down", K, 96, rank, 3)
        assert torch.equal(loader.load_linear(weights, shard).dequantize(), expected(full, shard))


# ---------------------------------------------------------------------------------------------
# Checkpoints written by the compressed-tensors package itself

@pytest.fixture(scope="module")
def float_llama(tmp_path_factory) -> Path:
    return write_hf_llama(tmp_path_factory.mktemp("float") / "llama", hidden=256, heads=8, kv_heads=2,
                          intermediate=512, layers=2, vocab=512)


PACKAGE_CASES = {
    "w4_group32_asym": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
    "w8_channel_sym": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    "w8_group64_asym": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64},
    "w4_tensor_asym": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "tensor"},
}
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_shards(layer: int, tp: int, rank: int):
    p = f"model.layers.{layer}"
    yield qkv_shard([f"{p}.self_attn.{x}_proj" for x in "qkv"], 256, 8, 2, 32, rank, tp)
    yield row_shard(f"{p}.self_attn.o_proj", 256, 256, rank, tp, unit=32)
    yield column_shard([(f"{p}.mlp.gate_proj", 512), (f"{p}.mlp.up_proj", 512)], 256, rank, tp)
    yield row_shard(f"{p}.mlp.down_proj", 512, 256, rank, tp)


def stored_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}


@pytest.fixture(scope="module")
def package_ckpt(tmp_path_factory, float_llama):
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = package_checkpoint(float_llama, tmp_path_factory.mktemp("pkg") / case, PACKAGE_CASES[case])
        return made[case]

    return get


@pytest.mark.parametrize("case", list(PACKAGE_CASES))
def test_package_checkpoint_matches_package_decompression_and_our_packer(package_ckpt, case):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    wargs = PACKAGE_CASES[case]
    path = package_ckpt(case)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    bits, offset = wargs["num_bits"], 1 << (wargs["num_bits"] - 1)

    # 1. qshard's rank slices == the package's own decompression (scales upcast: both exact).
    prefixes = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]
    full, full_fp16 = {}, {}
    for prefix in prefixes:
        stored = stored_tensors(path, prefix)
        full_fp16[prefix] = PackedQuantizationCompressor.decompress(stored, scheme)["weight"]
        stored["weight_scale"] = stored["weight_scale"].float()
        full[prefix] = PackedQuantizationCompressor.decompress(stored, scheme)["weight"]
    loader = get_loader(qc)
    weights = Weights(path, dtype=torch.float32)
    for tp in (1, 2, 4):
        for rank in range(tp):
            for layer in range(2):
                for shard in llama_shards(layer, tp, rank):
                    got = loader.load_linear(weights, shard).dequantize()
                    assert torch.equal(got, expected(full, shard)), (shard.sources, tp, rank)
                    if tp == 1:  # the package's fp16 result is ours rounded once
                        assert torch.equal(got.half(), expected(full_fp16, shard))

    # 2. Our packer, fed the package's codes / scales / zeros, writes the same bytes and config.
    strategy = wargs["strategy"]
    args = QuantArgs(bits=bits, sym=wargs["symmetric"], strategy="group" if strategy == "channel" else strategy,
                     group_size=-1 if strategy == "channel" else wargs.get("group_size"))
    packer = CompressedTensorsPacker(args)
    for prefix in prefixes:
        stored = stored_tensors(path, prefix)
        rows, cols = stored["weight_shape"].tolist()
        codes = unpack_from_int32(stored["weight_packed"], bits, (rows, cols)).int() + offset
        scales = stored["weight_scale"].float().reshape(-1, 1 if strategy != "group" else cols // wargs["group_size"])
        if wargs["symmetric"]:
            zeros = torch.full(scales.shape, offset, dtype=torch.int32)
        elif strategy == "tensor":
            zeros = stored["weight_zero_point"].int().reshape(1, 1) + offset
        else:
            zp_shape = (rows, scales.shape[1])
            zeros = unpack_from_int32(stored["weight_zero_point"], bits, zp_shape, packed_dim=0).int() + offset
        size = args.columns_per_group(cols)
        result = QuantResult(codes, scales.expand(rows, -1), zeros.expand(rows, -1),
                             torch.arange(cols, dtype=torch.int32) // size, size, bits, args.sym, 0.0)
        ours = packer.pack(prefix, result, torch.float16)
        assert sorted(ours) == sorted(f"{prefix}.{k}" for k in stored)
        for name, tensor in stored.items():
            mine = ours[f"{prefix}.{name}"]
            assert (mine.dtype, mine.shape) == (tensor.dtype, tensor.shape), (prefix, name)
            assert torch.equal(mine.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (prefix, name)
    ours_config = packer.quantization_config()
    assert ours_config.pop("version") == FORMAT_VERSION
    qc.pop("version")
    assert ours_config == qc


@pytest.mark.slow
def test_package_checkpoint_runs_at_tp2_like_tp1(package_ckpt):
    """End to end through the spawned-process executor: two ranks, one all-reduce per row layer."""
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    path = package_ckpt("w4_group32_asym")
    outs = {}
    for tp in (1, 2):
        with LLM(path, tensor_parallel_size=tp, dtype="float32", progress=False) as llm:
            outs[tp] = llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0, logprobs=0, ignore_eos=True))
    for one, two in zip(outs[1], outs[2]):
        assert one.token_ids == two.token_ids
        for a, b in zip(one.logprobs, two.logprobs):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in a) < 1e-4


def test_packing_equals_package_pack_to_int32():
    """Word for word, including lengths that are not a whole number of words (zero-padded)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from kernels.packing import pack_int32

    gen = torch.Generator().manual_seed(1)
    for bits in (2, 4, 8):
        offset = 1 << (bits - 1)
        for rows, cols in ((12, 40), (30, 7), (5, 64)):
            codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int32)
            signed = (codes - offset).to(torch.int8)
            assert torch.equal(pack_int32(codes, bits, dim=1), pack_to_int32(signed, bits, packed_dim=1))
            assert torch.equal(pack_int32(codes, bits, dim=0), pack_to_int32(signed, bits, packed_dim=0))


# ---------------------------------------------------------------------------------------------
# Our packer's checkpoint in transformers (compressed-tensors installed, CPU, float32)

PROMPTS = [[1, 5, 9, 100, 200, 7, 33], [1, 300, 2, 4], [1, 511, 17, 256, 42, 42, 8, 90]]
TRANSFORMERS_CASES = {
    # ignore by regex: down_proj stays float in both loaders
    "w4_group32_sym_ignore_down": (QuantArgs(bits=4, group_size=32, sym=True), torch.float16,
                                   ("lm_head", r"re:.*mlp\.down_proj$"), ("lm_head", "down_proj")),
    "w8_channel_sym": (QuantArgs(bits=8, group_size=-1, sym=True), torch.float16, ("lm_head",), ("lm_head",)),
    # transformers' default (compressed) load refuses asymmetric pack-quantized checkpoints, the
    # package's own included (weight_zero_point shape; llm-compressor issue 1618), so this one
    # loads with dequantize=True, which dequantizes in the stored scale dtype: stored float32.
    "w4_group32_asym": (QuantArgs(bits=4, group_size=32, sym=False), torch.float32, ("lm_head",), ("lm_head",)),
}


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("case", list(TRANSFORMERS_CASES))
def test_packer_checkpoint_loads_in_transformers_with_same_logits(tmp_path, float_llama, case):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    args, dtype, ignore, skip = TRANSFORMERS_CASES[case]
    out = export_quantized(float_llama, tmp_path / case, CompressedTensorsPacker(args, ignore=ignore),
                           lambda prefix, w: rtn_quantize(w, args), skip=skip, dtype=dtype, progress=False)
    kwargs = {} if args.sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        theirs = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in PROMPTS]).float()
    ours = engine_last_logits(out, PROMPTS, dtype=torch.float32)
    unquantized = engine_last_logits(float_llama, PROMPTS, dtype=torch.float32)
    diff = (theirs - ours).abs().max().item()
    quant_error = (unquantized - ours).abs().max().item()
    print(f"{case}: max |logit diff| = {diff:.3g} (logits up to {theirs.abs().max():.3g}; "
          f"quantization moved them by up to {quant_error:.3g})")
    assert diff < 1e-4
    assert quant_error > 100 * diff  # both sides really run the quantized weights
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert ("model.layers.0.mlp.down_proj.weight" in names) == ("down_proj" in skip)


# ---------------------------------------------------------------------------------------------
# Config parsing and bad input

def ct_config(**weights) -> dict:
    config = CompressedTensorsPacker(QuantArgs(bits=4, group_size=32, sym=True)).quantization_config()
    config["config_groups"]["group_0"]["weights"].update(weights)
    return config


@pytest.mark.parametrize("fmt", ["naive-quantized", "marlin-24", "dense"])
def test_unsupported_formats_are_refused_listing_what_is(fmt):
    config = ct_config()
    config["format"] = config["config_groups"]["group_0"]["format"] = fmt
    with pytest.raises(QuantConfigError, match=f"format '{fmt}'.*supported now: pack-quantized"):
        get_loader(config)


def test_three_bit_is_refused_though_the_package_packs_it():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs

    QuantizationArgs(num_bits=3, strategy="group", group_size=32)  # the package accepts 3 bits...
    assert pack_to_int32(torch.zeros(2, 32, dtype=torch.int8), 3).shape == (2, 3)  # ...packed densely
    with pytest.raises(QuantConfigError, match=r"num_bits=3 is not supported.*supported: 2, 4, 8.*does not say"):
        get_loader(ct_config(num_bits=3))


@pytest.mark.parametrize("change,message", [
    ({"type": "float"}, "weights.type='float'"),
    ({"strategy": "block", "group_size": None, "block_structure": [128, 128]}, "strategy='block'"),
    ({"strategy": "channel", "actorder": "group", "group_size": None}, "actorder 'group' needs strategy 'group'"),
    ({"actorder": "sideways"}, "actorder='sideways' is unknown"),
    ({"strategy": "group", "group_size": None}, "needs a positive group_size"),
])
def test_bad_weight_args(change, message):
    with pytest.raises(QuantConfigError, match=message):
        get_loader(ct_config(**change))


def test_bad_config_fields():
    for key, value, message in (("quantization_status", "frozen", "quantization_status is 'frozen'"),
                                ("transform_config", {"config_groups": {}}, "transform_config is set"),
                                ("kv_cache_scheme", {"num_bits": 8, "type": "float"}, "kv_cache_scheme is set")):
        config = ct_config()
        config[key] = value
        with pytest.raises(QuantConfigError, match=message):
            get_loader(config)
    config = ct_config()
    config["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "strategy": "token", "dynamic": True}
    with pytest.raises(QuantConfigError, match="quantizes activations"):
        get_loader(config)
    config = ct_config()
    config["format"] = "mixed-precision"
    CompressedTensorsConfig.parse(config)  # every group names its own format: fine
    del config["config_groups"]["group_0"]["format"]
    with pytest.raises(QuantConfigError, match="no format of its own"):
        get_loader(config)
    config = ct_config()
    config["config_groups"] = {"W3A7": ["Linear"]}
    with pytest.raises(QuantConfigError, match="preset scheme 'W3A7' is not supported"):
        get_loader(config)


def test_scheme_resolution_follows_compressed_tensors():
    """Exact names win over regexes over class names; ignore wins over all."""
    config = ct_config()
    config["config_groups"]["group_1"] = {"targets": ["re:.*mlp\\..*"], "format": "pack-quantized",
                                          "weights": {"num_bits": 8, "strategy": "channel", "symmetric": True}}
    config["config_groups"]["group_2"] = {"targets": ["model.layers.0.mlp.up_proj"], "format": "pack-quantized",
                                          "weights": {"num_bits": 4, "strategy": "group", "group_size": 64}}
    config["ignore"] = ["lm_head", "re:model\\.layers\\.1\\.self_attn\\.o_proj$"]
    parsed = CompressedTensorsConfig.parse(config)
    name = lambda module: getattr(parsed.scheme_for(module), "name", None)  # noqa: E731
    assert name("model.layers.0.self_attn.q_proj") == "group_0"
    assert name("model.layers.1.self_attn.o_proj") is None
    assert name("model.layers.0.self_attn.o_proj") == "group_0"
    assert name("model.layers.0.mlp.gate_proj") == "group_1"
    assert name("model.layers.0.mlp.up_proj") == "group_2"
    assert name("lm_head") is None
    # gate and up run as one matmul: different schemes cannot be fused
    loader = get_loader(config)
    shard = column_shard([("model.layers.0.mlp.gate_proj", 64), ("model.layers.0.mlp.up_proj", 64)], 64, 0, 1)
    with pytest.raises(QuantConfigError, match="quantized differently"):
        loader.load_linear(None, shard)


def test_actorder_group_is_written_the_legacy_way_which_the_package_now_refuses(tmp_path):
    from compressed_tensors.quantization import QuantizationArgs

    args = quant_args(4, 32, True, True)
    weights, config, full = write_synthetic(tmp_path / "m.safetensors", args, {"down": (96, K)})
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    assert weights.has("down.weight_g_idx")
    if ct.__version__.startswith("0.20"):
        with pytest.raises(ValueError, match="has been removed"):
            QuantizationArgs(num_bits=4, strategy="group", group_size=32, actorder="group")
    # a permuted g_idx needs actorder "group" in the packer
    reversed_groups = torch.arange(64, dtype=torch.int32).flip(0) // 32
    result = random_result(torch.Generator().manual_seed(0), 8, 64, args, reversed_groups)
    with pytest.raises(QuantConfigError, match="permuted g_idx"):
        CompressedTensorsPacker(quant_args(4, 32, True, False)).pack("x", result, torch.float16)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory, float_llama) -> Path:
    args = QuantArgs(bits=4, group_size=32, sym=False)
    return export_quantized(float_llama, tmp_path_factory.mktemp("ct") / "w4", CompressedTensorsPacker(args),
                            lambda prefix, w: rtn_quantize(w, args), progress=False)


def rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_weight_scale_is_named(tmp_path, small_export):
    name = "model.layers.1.self_attn.k_proj.weight_scale"
    broken = rewrite(small_export, tmp_path / "broken", lambda t: t.pop(name))
    with pytest.raises(ShardingError, match=f"tensor {name} is missing"):
        engine_last_logits(broken, PROMPTS[:1])


def test_weight_shape_disagreeing_with_config_is_named(tmp_path, small_export):
    name = "model.layers.0.mlp.down_proj.weight_shape"

    def edit(t):
        t[name] = torch.tensor([256, 520])

    broken = rewrite(small_export, tmp_path / "broken", edit)
    with pytest.raises(QuantConfigError, match=rf"tensor {name} = \[256, 520\] disagrees with the model config.*"
                                               rf"\[256, 512\]"):
        engine_last_logits(broken, PROMPTS[:1])
