"""Random weights of a named shape (load_format="dummy"): valid tensors, any box of a tensor
equals the same box of the whole, and TP=1 and TP=2 run the same model."""

from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ConfigError, ModelConfig
from engine.dummy import QUANTS, SHAPES, DummyWeights, parameter_count, write_config
from kernels.layouts import AWQLayout, GPTQLayout
from kernels.packing import packed_size
from kernels.reference import dequantize


def test_write_config_for_every_shape_and_quant(tmp_path):
    for shape in SHAPES:
        for quant in QUANTS:
            group = (QUANTS[quant] or {}).get("group_size", 1)
            if SHAPES[shape]["hidden_size"] % group or SHAPES[shape]["intermediate_size"] % group:
                with pytest.raises(ConfigError, match=f"{quant} needs hidden_size divisible by group_size"):
                    write_config(shape, quant, tmp_path / "x")
                continue
            cfg = ModelConfig.from_dir(write_config(shape, quant, tmp_path / f"{shape}-{quant}"))
            assert cfg.hidden_size == SHAPES[shape]["hidden_size"]
            assert (cfg.quantization_config or {}).get("quant_method") == (QUANTS[quant] or {}).get("quant_method")
    raw = json.loads((tmp_path / "llama-2-70b-none" / "config.json").read_text())
    assert (raw["num_key_value_heads"], raw["intermediate_size"], raw["num_hidden_layers"]) == (8, 28672, 80)
    cfg = ModelConfig.from_dir(tmp_path / "llama-2-7b-none")
    assert 6.6e9 < parameter_count(cfg) < 6.8e9  # Llama-2-7B has 6.74B parameters
    with pytest.raises(ConfigError, match="unknown model shape 'llama-9'"):
        write_config("llama-9", "none", tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown dummy quantization"):
        write_config("tiny", "gptq-w3", tmp_path / "x")


def test_any_box_equals_that_box_of_the_whole_tensor(tmp_path):
    cfg = ModelConfig.from_dir(write_config("tiny", "none", tmp_path))
    w = DummyWeights(cfg, dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj.weight"
    whole = w.read(name)
    assert list(whole.shape) == [128, 256] and whole.dtype == torch.float32
    box = w.read(name, (slice(16, 80), slice(100, 228)))
    assert torch.equal(box, whole[16:80, 100:228])
    assert abs(whole.std().item() - 0.02) < 0.002 and abs(whole.mean().item()) < 0.002
    assert not torch.equal(whole, w.read("model.layers.0.mlp.down_proj.weight"))  # per-tensor streams
    assert torch.equal(w.read("model.norm.weight"), torch.ones(128))
    assert torch.equal(DummyWeights(cfg, seed=0).read(name), whole)
    assert not torch.equal(DummyWeights(cfg, seed=1).read(name), whole)
    assert w.bytes_read == 0


@pytest.mark.parametrize("quant", ["gptq-w4g128", "awq-w4g128"])
def test_quantized_dummy_tensors_are_valid_packed_layouts(tmp_path, quant):
    cfg = ModelConfig.from_dir(write_config("tiny", quant, tmp_path))
    w = DummyWeights(cfg, dtype=torch.bfloat16)
    p = "model.layers.0.mlp.down_proj"  # K = 256 (2 groups), N = 128
    K, N = 256, 128
    qweight, qzeros, scales = (w.read(f"{p}.{s}") for s in ("qweight", "qzeros", "scales"))
    assert qweight.dtype == qzeros.dtype == torch.int32
    assert 0.002 < scales.float().min() and scales.float().max() < 0.01  # small: activations stay in range
    if quant.startswith("gptq"):
        assert list(qweight.shape) == [packed_size(K, 4), N] and list(scales.shape) == [2, N]
        assert torch.all(qzeros == 0x77777777)  # v1: stored z - 1 = 7
        g_idx = w.read(f"{p}.g_idx")
        assert torch.equal(g_idx, torch.arange(K, dtype=torch.int32) // 128)
        zeros = torch.full((2, packed_size(N, 4)), 0x88888888 - 2**32, dtype=torch.int32)  # true z = 8
        weight = dequantize(GPTQLayout(qweight, scales.float(), zeros, g_idx, 4, 128, K, N))
    else:
        assert list(qweight.shape) == [K, packed_size(N, 4)] and list(scales.shape) == [2, N]
        weight = dequantize(AWQLayout(qweight, scales.float(), qzeros, 128, K, N))
    assert weight.shape == (N, K)
    assert abs(weight.std().item() - 0.02) < 0.004 and abs(weight.mean().item()) < 0.003
    codes = torch.stack([(qweight >> (4 * i)) & 15 for i in range(8)]).flatten().bincount(minlength=16)
    assert codes.min() > 0.5 * codes.float().mean()  # every 4-bit code occurs, roughly uniformly


@pytest.mark.slow
def test_dummy_model_runs_without_tokenizer_and_tp2_equals_tp1(tmp_path):
    path = write_config("tiny", "none", tmp_path)
    prompts = [[5, 6, 7, 8], [100, 200, 300]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with LLM(path, load_format="dummy", dtype="float32", progress=False) as llm:
        assert llm.tokenizer is None
        tp1 = [o.token_ids for o in llm.generate(prompts, params)]
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate("text needs a tokenizer")
    with LLM(path, tensor_parallel_size=2, executor="mp", load_format="dummy", dtype="float32", progress=False) as llm:
        tp2 = [o.token_ids for o in llm.generate(prompts, params)]
    assert tp1 == tp2 and all(len(t) == 8 for t in tp1)
    assert len({t for seq in tp1 for t in seq}) > 1  # not a constant
    with pytest.raises(ValueError, match="load_format must be"):
        LLM(path, load_format="pt")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["gptq-w4g128", "awq-w4g128"])
def test_quantized_dummy_shape_loads_through_its_format_loader_at_tp2(tmp_path, quant):
    from quant import registered_methods

    method = QUANTS[quant]["quant_method"]
    if method not in registered_methods():
        pytest.skip(f"no {method} loader in this build")
    path = write_config("tiny", quant, tmp_path)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(path, load_format="dummy", progress=False) as llm:
        tp1 = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(path, tensor_parallel_size=2, executor="mp", load_format="dummy", progress=False) as llm:
        tp2 = [o.token_ids for o in llm.generate(prompts, params)]
    assert tp1 == tp2 and len({t for seq in tp1 for t in seq}) > 2
