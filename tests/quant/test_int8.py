"""int8: compressed-tensors int-quantized (W8A16 and W8A8 per-token) and EETQ (float checkpoints
quantized at load). Every rank's dequantized weight at TP 1-4 against the full one, the package's
own checkpoint (our weights == its decompression; logits == transformers'), bad input, and the
default model end to end."""

from __future__ import annotations

import pytest
import torch

from engine.weights import Weights
from tests.kernels.kernel_checks import bf16_cpu_backend
from kernels import act_quant
from parallel.sharding import Layout, column_shard, row_shard
from quant import QuantConfigError, get_loader
from quant.int8.loader import quantize_int8_per_channel
from tests.quant.checkpoints import expected_slice, save_checkpoint
from tests.quant.ct_package import package_checkpoint
from tests.quant.test_fp8 import (SOURCES, K, check_end_to_end, convert_default, ct_config, engine_logits,
                                  float_default_logits, float_llama, layer_shards,
                                  package_weights_match_ours, transformers_logits, TINY_PROMPTS)

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["float_default_logits", "float_llama"]  # fixtures shared with test_fp8


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {src: torch.randn(n, K, generator=gen) * (0.5 + i) for i, (src, n) in enumerate(SOURCES.items())}


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
@pytest.mark.parametrize("w8a8", [False, True])
def test_int_quantized_every_rank_slice_is_bit_exact(tmp_path, strategy, w8a8):
    tensors, full = {}, {}
    for src, w in random_weights().items():
        if strategy == "channel":
            q, s = quantize_int8_per_channel(w)
            stored = s.reshape(-1, 1)
        else:
            s = w.abs().amax() / 127
            q, stored = (w / s).round().clamp(-127, 127).to(torch.int8), s.reshape(1)
        tensors[f"{src}.weight"], tensors[f"{src}.weight_scale"] = q, stored
        full[src] = q.float() * stored.float()
    save_checkpoint(tmp_path, tensors)
    config = ct_config("int-quantized", "int", w8a8)
    config["config_groups"]["group_0"]["weights"]["strategy"] = strategy
    loader, weights, checked = get_loader(config), Weights(tmp_path), 0
    for tp in (1, 2, 3, 4):
        for rank in range(tp):
            for kind, shard in layer_shards(tp, rank).items():
                linear = loader.load_linear(weights, shard)
                assert linear.prepared.layout.dynamic_act == w8a8
                assert torch.equal(linear.dequantize(), expected_slice(full, shard)), f"{kind} tp={tp} rank={rank}"
                checked += 1
    assert checked == 58


def test_eetq_quantizes_each_rank_shard_at_load(tmp_path):
    """Column shards hold whole rows: exactly the TP=1 codes and scales. Row shards quantize their
    own part of each row (TGI's way): the quantization of the slice, never coarser than TP=1's."""
    floats = random_weights(1)
    save_checkpoint(tmp_path / "ckpt", {f"{src}.weight": w for src, w in floats.items()})
    weights, loader = Weights(tmp_path / "ckpt"), get_loader({"quant_method": "eetq", "weights": "int8"})
    tp1 = {}
    for src, w in floats.items():
        q, s = quantize_int8_per_channel(w)
        tp1[src] = q.float() * s[:, None]
    checked = 0
    for tp in (1, 2, 3, 4):
        for rank in range(tp):
            for kind, shard in layer_shards(tp, rank).items():
                weights.bytes_read = 0
                linear = loader.load_linear(weights, shard)
                assert linear.prepared.layout.weight.dtype == torch.int8
                got = linear.dequantize()
                if shard.layout is Layout.ROW:
                    q, s = quantize_int8_per_channel(expected_slice(floats, shard))
                    assert torch.equal(got, q.float() * s[:, None]), f"{kind} tp={tp} rank={rank}"
                else:
                    assert torch.equal(got, expected_slice(tp1, shard)), f"{kind} tp={tp} rank={rank}"
                assert weights.bytes_read == 4 * shard.local_out_features * shard.local_in_features  # own shard only
                checked += 1
    assert checked == 58


def test_eetq_leaves_lm_head_and_modules_to_not_convert_in_float(tmp_path):
    w = torch.randn(16, 32)
    save_checkpoint(tmp_path, {"lm_head.weight": w, "a.gate.weight": w.clone()})
    loader = get_loader({"quant_method": "eetq", "modules_to_not_convert": ["gate"]})
    for name in ("lm_head", "a.gate"):
        assert torch.equal(loader.load_linear(Weights(tmp_path), column_shard([(name, 16)], 32, 0, 1)).dequantize(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_runs_w8a16_on_cpu_and_its_emulation_quantizes_per_token(tmp_path, dtype):
    q, s = quantize_int8_per_channel(torch.randn(64, 96, generator=torch.Generator().manual_seed(2)))
    save_checkpoint(tmp_path, {"x.weight": q, "x.weight_scale": s.reshape(-1, 1)})
    linear = get_loader(ct_config("int-quantized", "int", True)).load_linear(
        Weights(tmp_path, dtype=dtype), column_shard([("x", 64)], 96, 0, 1))
    assert linear.prepared.backend == (bf16_cpu_backend(linear.prepared.layout, "cpu-int8") if dtype == torch.bfloat16
                                       else "dequant")
    w = q.double() * s.double()[:, None]
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(3))
    x[1, 5] = 40.0  # an outlier coarsens only its own token's scale
    xq, xs = act_quant.quantize_per_token(x, fp8=False)
    assert xq.dtype == torch.int8 and int(xq[1, 5]) == 127 and torch.equal(xs[:, 0], x.abs().amax(1) / 127)
    tol = 1e-5 if dtype == torch.float32 else 0.02

    def rel(got, want):
        return ((got.double() - want).abs() / want.abs().amax(1, keepdim=True)).max()

    assert rel(linear(x.to(dtype)), x.double() @ w.T) < tol
    emulated = act_quant.EmulatedW8A8Weight(linear.prepared, linear.prepared.layout)
    assert rel(emulated.matmul(x.to(dtype)), (xq.double() * xs.double()) @ w.T) < tol


# -- compressed-tensors int-quantized, written by the package ---------------------------------------

CT_INT_CHANNEL = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}
CT_INT_TOKEN = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("w8a8", [True, False])
def test_package_int_quantized_checkpoint(tmp_path, float_llama, w8a8):
    out = package_checkpoint(float_llama, tmp_path / "ct", CT_INT_CHANNEL, "int-quantized",
                             CT_INT_TOKEN if w8a8 else None, torch.float32)
    assert package_weights_match_ours(out, "int-quantized") == 16
    ours = engine_logits(out, TINY_PROMPTS, emulate_w8a8=w8a8)
    theirs = transformers_logits(out)
    moved = (engine_logits(float_llama, TINY_PROMPTS) - ours).abs().max().item()
    diff = (ours - theirs).abs().max().item()
    print(f"CT int8 W8A{8 if w8a8 else 16}: |ours - transformers| {diff:.3g}, quantization moved logits {moved:.3g}")
    # Measured: W8A16 |diff| 2e-6 (quantization moves logits 0.06). W8A8 (emulated) 0.095, as large
    # as the activation rounding itself (0.075): compressed-tensors' activation scale is amax / 127.5
    # with codes clamped to [-128, 127], ours amax / 127 (vLLM's), so many codes differ by one; the
    # weights are bit-identical (package_weights_match_ours). A loose bound only for W8A8.
    if w8a8:
        assert diff < 0.15
    else:
        assert diff < 1e-4 and moved > 100 * diff


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_int8_input(tmp_path):
    q = torch.ones(8, 16, dtype=torch.int8)
    config = ct_config("int-quantized", "int", True)
    shard = column_shard([("x", 8)], 16, 0, 1)
    for name, tensors, match in (
        ("shape", {"x.weight": q, "x.weight_scale": torch.ones(8, 2)},
         r"tensor x.weight_scale has shape \[8, 2\]; int-quantized expects one of \[\[8\], \[8, 1\]\]"),
        ("missing", {"x.weight": q}, r"tensor x.weight_scale is missing from the int-quantized checkpoint"),
        ("dtype", {"x.weight": q.to(torch.int16), "x.weight_scale": torch.ones(8, 1)},
         r"tensor x.weight has dtype torch.int16; int-quantized stores quantized weights as torch.int8"),
    ):
        save_checkpoint(tmp_path / name, tensors)
        with pytest.raises(QuantConfigError, match=match):
            get_loader(config).load_linear(Weights(tmp_path / name), shard)
    for change, match in (({"strategy": "group", "group_size": 32}, r"weights.strategy='group' is not supported"),
                          ({"symmetric": False}, r"weights.symmetric=false is not supported"),
                          ({"num_bits": 4}, r"weights is 4-bit int; int-quantized holds 8-bit int values")):
        bad = ct_config("int-quantized", "int", False)
        bad["config_groups"]["group_0"]["weights"].update(change)
        with pytest.raises(QuantConfigError, match=match):
            get_loader(bad)
    bad = ct_config("int-quantized", "int", True)
    bad["config_groups"]["group_0"]["input_activations"].update(dynamic=False)
    with pytest.raises(QuantConfigError, match=r"input_activations \(dynamic=False, strategy='token'\) is not supp"):
        get_loader(bad)
    with pytest.raises(QuantConfigError, match=r"eetq quantization_config field weights='int4' is not supported"):
        get_loader({"quant_method": "eetq", "weights": "int4"})
    save_checkpoint(tmp_path / "eetq", {"x.weight": q, "x.weight_scales": torch.ones(8)})
    with pytest.raises(QuantConfigError, match=r"tensor x.weight is stored quantized .*preprocessed order"):
        get_loader({"quant_method": "eetq"}).load_linear(Weights(tmp_path / "eetq"), shard)


# -- the default model end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_ct_int_quantized_w8a8(default_model_dir, tmp_path_factory, float_default_logits):
    path = convert_default(default_model_dir, tmp_path_factory.mktemp("ct-int8") / "ct",
                           ct_config("int-quantized", "int", True), quantize_int8_per_channel)
    # Measured max |logit diff| 1.02, KL 0.003-0.012 (float logits std ~4): int8 per-channel weights; on CPU
    # the per-token int8 activations are not applied (W8A16, kernels.act_quant).
    check_end_to_end(path, float_default_logits, "compressed-tensors int8 W8A8 (W8A16 on CPU)", 1.6, 0.04)
