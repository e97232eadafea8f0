"""FP8: quant_method "fp8" / "fbgemm_fp8" and compressed-tensors float-quantized. Every rank's
dequantized weight is the slice of the full one at TP 1-4 (bit exact), W8A8 activations through
the kernels dispatch, a checkpoint written by the compressed-tensors package (our weights == its
decompression; our logits == transformers'), bad input, and the default model end to end."""

from __future__ import annotations

import json

import pytest
import torch

from engine.weights import Weights
from kernels import act_quant
from parallel.sharding import column_shard, qkv_shard, row_shard
from quant import QuantConfigError, get_loader
from tests.quant.checkpoints import expected_slice, save_checkpoint
from tests.quant.ct_package import package_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FP8 = torch.float8_e4m3fn
CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic"}

# -- writing FP8 tensors (the format facts: w = q * scale, q = w / scale in e4m3) ------------------


def quantize_fp8(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [N, K], scale float32 [N] or 0-d) with w ~= codes * scale."""
    amax = w.abs().amax(1) if per_channel else w.abs().amax()
    scale = (amax.float() / 448).clamp(min=1e-12)
    q = (w.float() / (scale[:, None] if per_channel else scale)).clamp(-448, 448).to(FP8)
    return q, scale


def dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * (scale[:, None] if scale.dim() else scale)


STORED_SHAPE = {"tensor0": lambda s, n: s.reshape(()), "tensor1": lambda s, n: s.reshape(1),
                "channel1": lambda s, n: s.reshape(n), "channel2": lambda s, n: s.reshape(n, 1)}

# -- every rank's slice ------------------------------------------------------------------------------

K = 96  # splits evenly at TP 1-4
SOURCES = {"col": 48, "gate": 48, "up": 96, "row": 48, "q": 96, "k": 16, "v": 16, "k1": 8, "v1": 8, "k3": 24,
           "v3": 24, "qkv": 128}


def layer_shards(tp: int, rank: int) -> dict:
    shards = {"column": column_shard([("col", 48)], K, rank, tp),
              "gate_up": column_shard([("gate", 48), ("up", 96)], K, rank, tp),
              "row": row_shard("row", K, 48, rank, tp),
              "qkv_1kv": qkv_shard(["q", "k1", "v1"], K, 12, 1, 8, rank, tp)}  # KV replicated at TP > 1
    if tp in (1, 2, 4):
        shards["qkv"] = qkv_shard(["q", "k", "v"], K, 12, 2, 8, rank, tp)
        shards["qkv_stored_fused"] = qkv_shard(["qkv"], K, 12, 2, 8, rank, tp, fused=True)
    if tp in (1, 3):
        shards["qkv_3kv"] = qkv_shard(["q", "k3", "v3"], K, 12, 3, 8, rank, tp)
    return shards


def fp8_checkpoint(path, stored: str, scale_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors, full = {}, {}
    for i, (src, n) in enumerate(SOURCES.items()):
        w = torch.randn(n, K, generator=gen) * (0.5 + i)  # each source its own range: distinct scales
        q, s = quantize_fp8(w, per_channel=stored.startswith("channel"))
        tensors[f"{src}.weight"], tensors[f"{src}.{scale_name}"] = q, STORED_SHAPE[stored](s, n)
        full[src] = dequant(q, s)
    save_checkpoint(path, tensors)
    return full


@pytest.mark.parametrize("scale_name", ["weight_scale", "weight_scale_inv"])
@pytest.mark.parametrize("stored", list(STORED_SHAPE))
def test_every_rank_slice_is_bit_exact(tmp_path, stored, scale_name):
    full = fp8_checkpoint(tmp_path, stored, scale_name)
    weights, loader = Weights(tmp_path), get_loader(CONFIG)
    checked = 0
    for tp in (1, 2, 3, 4):
        for rank in range(tp):
            for kind, shard in layer_shards(tp, rank).items():
                got = loader.load_linear(weights, shard).dequantize()
                want = expected_slice(full, shard)
                assert got.shape == want.shape and torch.equal(got, want), f"{kind} tp={tp} rank={rank}"
                checked += 1
    assert checked == 58


def test_per_tensor_scales_of_fused_parts_become_per_channel(tmp_path):
    full = fp8_checkpoint(tmp_path, "tensor0", "weight_scale")
    single = get_loader(CONFIG).load_linear(Weights(tmp_path), column_shard([("col", 48)], K, 0, 1))
    fused = get_loader(CONFIG).load_linear(Weights(tmp_path), qkv_shard(["q", "k", "v"], K, 12, 2, 8, 1, 2))
    assert single.prepared.layout.scales.dim() == 0
    scales = fused.prepared.layout.scales
    assert scales.shape == (64,) and scales[:48].unique().numel() == 1 and scales[48:56].unique().numel() == 1
    assert torch.equal(fused.dequantize(), expected_slice(full, qkv_shard(["q", "k", "v"], K, 12, 2, 8, 1, 2)))


def test_fbgemm_fp8_per_channel_and_scale_cap(tmp_path):
    full = fp8_checkpoint(tmp_path, "channel2", "weight_scale")
    config = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 2.0, "modules_to_not_convert": ["lm_head"]}
    linear = get_loader(config).load_linear(Weights(tmp_path), row_shard("row", K, 48, 1, 3))
    assert torch.equal(linear.dequantize(), full["row"][:, 32:64])
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 3
    # W8A8 (the emulation of the CUDA path): the token amax is capped at 2.0 before the scale is taken
    capped = act_quant.fake_quantize_per_token(x, fp8=True, scale_ub=2.0)
    emulated = act_quant.EmulatedW8A8Weight(linear.prepared, linear.prepared.layout)
    assert capped.abs().max() <= 2.0 and torch.allclose(emulated.matmul(x), capped @ full["row"][:, 32:64].T,
                                                        atol=1e-5)
    save_checkpoint(tmp_path / "t", {"x.weight": torch.ones(8, 16, dtype=FP8), "x.weight_scale": torch.ones(1)})
    with pytest.raises(QuantConfigError, match=r"tensor x.weight_scale has shape \[1\]; fbgemm_fp8 expects one of "
                                               r"\[\[8\], \[8, 1\]\]"):
        get_loader(config).load_linear(Weights(tmp_path / "t"), column_shard([("x", 8)], 16, 0, 1))


# -- through the kernels --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_runs_w8a16_on_cpu_and_its_emulation_quantizes_per_token(tmp_path, dtype):
    full = fp8_checkpoint(tmp_path, "channel1", "weight_scale")
    linear = get_loader(CONFIG).load_linear(Weights(tmp_path, dtype=dtype), column_shard([("up", 96)], K, 0, 1))
    assert linear.prepared.backend == "dequant" and linear.prepared.layout.dynamic_act  # CPU: W8A16
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(0))
    x[2] *= 100  # per token: one loud token does not coarsen the others' scales
    tol = 1e-4 if dtype == torch.float32 else 0.05  # bf16: x and the weight rounded to 8 bits first

    def rel(got, want):
        return ((got.double() - want).abs() / want.abs().amax(1, keepdim=True)).max()

    plain = x.double() @ full["up"].double().T
    assert rel(linear(x.to(dtype)), plain) < tol
    q, s = act_quant.quantize_per_token(x, fp8=True)
    assert q.dtype == FP8 and s.shape == (5, 1) and torch.equal(s[:, 0], x.abs().amax(1) / 448)
    want = (q.double() * s.double()) @ full["up"].double().T
    emulated = act_quant.EmulatedW8A8Weight(linear.prepared, linear.prepared.layout)
    assert emulated.backend == "dequant+a8-emulated" and rel(emulated.matmul(x.to(dtype)), want) < tol
    assert rel(plain, want) > 0.01  # e4m3 activations really move the result (~3% per token)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, match", [
    ("activation_scheme", "per-token", r"activation_scheme='per-token' is unknown; supported: dynamic, static"),
    ("weight_block_size", [128, 128], r"weight_block_size=\[128, 128\]: block-wise FP8 scales are not supported"),
    ("ignored_layers", "lm_head", r"ignored_layers='lm_head' must be a list"),
])
def test_bad_config(field, value, match):
    with pytest.raises(QuantConfigError, match=match):
        get_loader({**CONFIG, field: value})


def test_bad_tensors_are_named(tmp_path):
    q = torch.ones(8, 16, dtype=FP8)
    cases = {
        "shape": ({"x.weight": q, "x.weight_scale": torch.ones(4)},
                  r"tensor x.weight_scale has shape \[4\]; fp8 expects one of \[\[\], \[1\], \[8\], \[8, 1\]\]"),
        "block": ({"x.weight": q, "x.weight_scale_inv": torch.ones(1, 1)},
                  r"x.weight_scale_inv has shape \[1, 1\].*block-wise"),
        "missing": ({"x.weight": q}, r"tensor x.weight_scale is missing from the fp8 checkpoint \(a quantized weight "
                                     r"needs weight_scale or weight_scale_inv\)"),
        "both": ({"x.weight": q, "x.weight_scale": torch.ones(()), "x.weight_scale_inv": torch.ones(())},
                 r"stores both x.weight_scale and x.weight_scale_inv"),
        "e5m2": ({"x.weight": torch.ones(8, 16, dtype=torch.float8_e5m2), "x.weight_scale": torch.ones(())},
                 r"tensor x.weight has dtype torch.float8_e5m2; fp8 stores quantized weights as torch.float8_e4m3fn"),
        "bf16_with_scale": ({"x.weight": torch.ones(8, 16, dtype=torch.bfloat16), "x.weight_scale": torch.ones(())},
                            r"tensor x.weight has dtype torch.bfloat16; fp8 stores quantized weights"),
        "nan_scale": ({"x.weight": q, "x.weight_scale": torch.tensor(float("nan"))}, r"x.weight_scale holds non-finite"),
    }
    for name, (tensors, match) in cases.items():
        save_checkpoint(tmp_path / name, tensors)
        with pytest.raises(QuantConfigError, match=match):
            get_loader(CONFIG).load_linear(Weights(tmp_path / name), column_shard([("x", 8)], 16, 0, 1))
    save_checkpoint(tmp_path / "static", {"x.weight": q, "x.weight_scale": torch.ones(())})
    with pytest.raises(QuantConfigError, match=r"tensor x.input_scale is missing: fp8 activation_scheme 'static'"):
        get_loader({**CONFIG, "activation_scheme": "static"}).load_linear(
            Weights(tmp_path / "static"), column_shard([("x", 8)], 16, 0, 1))


def test_float_layers_load_dense_and_ignored_layers_are_honoured(tmp_path):
    w = torch.randn(8, 16)
    save_checkpoint(tmp_path, {"lm_head.weight": w, "a.mlp.x.weight": w.to(FP8), "a.mlp.x.weight_scale": torch.ones(())})
    loader = get_loader({**CONFIG, "ignored_layers": ["a.mlp.x"]})
    assert torch.equal(loader.load_linear(Weights(tmp_path), column_shard([("lm_head", 8)], 16, 0, 1)).dequantize(), w)
    # an ignored layer must be stored in float: float8 under an ignored name is a wrong dtype
    with pytest.raises(QuantConfigError, match=r"tensor a.mlp.x.weight is torch.float8_e4m3fn but a.mlp.x is an "
                                               r"ignored \(float\) layer of the fp8 config"):
        loader.load_linear(Weights(tmp_path), column_shard([("a.mlp.x", 8)], 16, 0, 1))


# -- compressed-tensors float-quantized, written by the compressed-tensors package ----------------

CT_WEIGHTS = {"channel": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
              "tensor": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}}
CT_DYNAMIC_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory):
    from tests.helpers import write_hf_llama

    return write_hf_llama(tmp_path_factory.mktemp("float") / "llama", hidden=128, heads=8, kv_heads=2,
                          intermediate=256, layers=2, vocab=256)


def package_weights_match_ours(out, fmt: str, tp: int = 2) -> int:
    """Every rank's dequantized weight == the slice of the package's own decompression."""
    from safetensors import safe_open

    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from tests.quant.test_compressed_tensors import PROJ, llama_shards

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    full = {}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for layer in range(2):
            for proj in PROJ:
                p = f"model.layers.{layer}.{proj}"
                assert f.get_tensor(f"{p}.weight").dtype == (FP8 if fmt == "float-quantized" else torch.int8)
                state = {k: f.get_tensor(f"{p}.{k}") for k in ("weight", "weight_scale")}
                full[p] = NaiveQuantizationCompressor.decompress(state, scheme)["weight"].float()
    loader, weights, checked = get_loader(qc), Weights(out), 0
    for rank in range(tp):
        for layer in range(2):
            for shard in _small_shards(layer, tp, rank):
                assert torch.equal(loader.load_linear(weights, shard).dequantize(), expected_slice(full, shard))
                checked += 1
    return checked


def _small_shards(layer: int, tp: int, rank: int):
    p = f"model.layers.{layer}"
    yield qkv_shard([f"{p}.self_attn.{x}_proj" for x in "qkv"], 128, 8, 2, 16, rank, tp)
    yield row_shard(f"{p}.self_attn.o_proj", 128, 128, rank, tp, unit=16)
    yield column_shard([(f"{p}.mlp.gate_proj", 256), (f"{p}.mlp.up_proj", 256)], 128, rank, tp)
    yield row_shard(f"{p}.mlp.down_proj", 256, 128, rank, tp)


TINY_PROMPTS = [[1, 5, 9, 100, 200, 7, 33], [1, 200, 2, 4]]


def transformers_logits(out, prompts=TINY_PROMPTS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts]).float()


def engine_logits(path, prompts, emulate_w8a8: bool = False) -> torch.Tensor:
    """tests.helpers.engine_last_logits, optionally with every W8A8 layer's CPU W8A16 matmul
    swapped for the emulation of the CUDA path (per-token 8-bit activations)."""
    from engine.batch import ForwardBatch
    from engine.engine_config import EngineConfig
    from engine.worker import Worker
    from parallel.state import single_process
    from quant.base import KernelLinear

    worker = Worker(EngineConfig(str(path), dtype=torch.float32, progress=False), single_process("cpu"))
    swapped = 0
    for module in worker.model.modules():
        if emulate_w8a8 and isinstance(module, KernelLinear) and act_quant.wants_dynamic(module.prepared.layout):
            module.prepared = act_quant.EmulatedW8A8Weight(module.prepared, module.prepared.layout)
            swapped += 1
    assert swapped or not emulate_w8a8
    batch = ForwardBatch.build(prompts, [0] * len(prompts), list(range(len(prompts))), torch.device("cpu"))
    with torch.inference_mode():
        worker.cache.reserve(len(prompts), max(len(p) for p in prompts))
        return worker.model.compute_logits(worker.model(batch, worker.cache)).float()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("strategy, dynamic", [("channel", True), ("tensor", False)])
def test_package_float_quantized_checkpoint(tmp_path, float_llama, strategy, dynamic):
    out = package_checkpoint(float_llama, tmp_path / "ct", CT_WEIGHTS[strategy], "float-quantized",
                             CT_DYNAMIC_TOKEN if dynamic else None, torch.float32)
    assert package_weights_match_ours(out, "float-quantized") == 16
    ours = engine_logits(out, TINY_PROMPTS, emulate_w8a8=dynamic)
    theirs = transformers_logits(out)
    moved = (engine_logits(float_llama, TINY_PROMPTS) - ours).abs().max().item()
    diff = (ours - theirs).abs().max().item()
    print(f"CT FP8 {strategy} dynamic={dynamic}: |ours - transformers| {diff:.3g}, quantization moved logits {moved:.3g}")
    # Measured: |ours - transformers| 2e-6 (W8A16, tensor) and 1e-6 (W8A8: our per-token FP8
    # activations, emulated, round as transformers' do); quantization moves logits 0.23-0.37.
    # (On CPU qshard runs W8A8 checkpoints W8A16: 0.23 from transformers here, see kernels.act_quant.)
    assert diff < 1e-4 and moved > 100 * diff


# -- the default model end to end -----------------------------------------------------------------


class EightBitWriter:
    """A quant.base.Packer-shaped writer for export_quantized: `quantize` hands it the float weight,
    it writes `weight` (8-bit codes) and `weight_scale` [N, 1] float32, per channel."""

    method = "test"

    def __init__(self, quantization_config: dict, quantize):
        self.config, self.quantize = quantization_config, quantize

    def pack(self, prefix, w, dtype):
        q, s = self.quantize(w)
        return {f"{prefix}.weight": q, f"{prefix}.weight_scale": s.reshape(-1, 1).float()}

    def quantization_config(self):
        return self.config

    def extra_files(self):
        return []


def ct_config(fmt: str, weight_type: str, dynamic_act: bool) -> dict:
    """The quantization_config compressed-tensors 0.20 writes for a channel-wise 8-bit scheme."""
    weights = {"num_bits": 8, "type": weight_type, "strategy": "channel", "symmetric": True, "dynamic": False}
    acts = {"num_bits": 8, "type": weight_type, "strategy": "token", "symmetric": True, "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": fmt,
                                          "input_activations": acts if dynamic_act else None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "version": "0.20.0"}


def convert_default(default_model_dir, out, config: dict, quantize):
    from quant.export import export_quantized

    return export_quantized(default_model_dir, out, EightBitWriter(config, quantize), lambda prefix, w: w,
                            dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def float_default_logits(default_model_dir):
    from tests.helpers import engine_last_logits
    from tests.quant.checkpoints import PROMPTS

    return engine_last_logits(default_model_dir, PROMPTS)


def check_end_to_end(path, float_logits, what: str, max_diff: float, max_kl: float) -> None:
    """TP=3 greedy tokens == TP=1's; logits within the format's error of the float model's."""
    from tests.helpers import engine_last_logits
    from tests.quant.checkpoints import PROMPTS, greedy_tokens
    from tests.quant.test_marlin import logit_gap

    prompts = PROMPTS[:2]
    assert greedy_tokens(path, tp=3, prompts=prompts) == greedy_tokens(path, prompts=prompts)
    diff, kl = logit_gap(engine_last_logits(path, PROMPTS), float_logits)
    print(f"{what} vs float: max |logit diff| {diff:.3f}, KL per prompt {kl}")
    assert diff < max_diff and max(kl) < max_kl


@pytest.mark.slow
def test_default_model_fp8_per_channel(default_model_dir, tmp_path_factory, float_default_logits):
    path = convert_default(default_model_dir, tmp_path_factory.mktemp("fp8") / "fp8", CONFIG,
                           lambda w: quantize_fp8(w, per_channel=True))
    # Measured max |logit diff| 3.24, KL 0.03-0.06 (float logits std ~4): e4m3 weights per channel
    # (3 mantissa bits); activations stay 16-bit on CPU (kernels.act_quant).
    check_end_to_end(path, float_default_logits, "fp8 per-channel (W8A16 on CPU)", 4.5, 0.15)


@pytest.mark.slow
def test_default_model_ct_float_quantized_w8a8(default_model_dir, tmp_path_factory, float_default_logits):
    path = convert_default(default_model_dir, tmp_path_factory.mktemp("ct-fp8") / "ct",
                           ct_config("float-quantized", "float", True), lambda w: quantize_fp8(w, per_channel=True))
    # Measured max |logit diff| 3.24, KL 0.03-0.06: the same numbers as quant_method fp8 above.
    check_end_to_end(path, float_default_logits, "compressed-tensors FP8 W8A8 (W8A16 on CPU)", 4.5, 0.15)
