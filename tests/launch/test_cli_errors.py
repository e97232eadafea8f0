"""Bad input through the real `qshard` CLI: each row runs `python -m launch.cli ...` as a
subprocess and must exit 2 with exactly one `error:` line on stderr that names the field, tensor,
file or value, and no traceback anywhere. Every refusal here happens before a model loads (the
wrong-shape rows load a one-layer model of a few MB), so each row costs about one interpreter start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import write_hf_llama
from tests.launch.conftest import REPO, child_env

CLI = [sys.executable, "-m", "launch.cli"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_dir) -> Path:
    """A one-layer float Llama (8 heads, 2 KV heads) with the default model's tokenizer, so text
    prompts reach the checks under test."""
    d = write_hf_llama(tmp_path_factory.mktemp("tiny"), hidden=64, heads=8, kv_heads=2, intermediate=128,
                       layers=1, vocab=49152, tied=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, d / name)
    return d


def _edit_config(d: Path, **fields) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))


def _unchanged(d: Path) -> None:
    pass


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


def _config_not_json(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,,}')


def _gpt2(d: Path) -> None:
    _edit_config(d, model_type="gpt2")


def _bin_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"a pickle that must never be unpickled")


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _gptq_bits5(d: Path) -> None:
    _edit_config(d, quantization_config={"quant_method": "gptq", "bits": 5, "group_size": 32, "sym": True,
                                         "desc_act": False})


def _up_proj_wrong_shape(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:100].contiguous()  # [100, 64] where the config says [128, 64]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _intermediate_disagrees(d: Path) -> None:
    _edit_config(d, intermediate_size=96)


def _missing_tensor(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _truncated(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


GEN = ["generate", "--prompt", "Hello"]

# (id, argv after `qshard` ({model}: the default model, {tiny}: a fresh copy of the tiny one after
# `setup`, {tmp}: the test's tmp dir), setup of the tiny copy or None, expected text of the error line)
ROWS = [
    # prompts: refused before the model loads
    ("empty-prompt", ["generate", "--model", "{model}", "--prompt", ""], None, "prompt 0 is empty"),
    ("second-prompt-empty", ["generate", "--model", "{model}", "--prompt", "hi", "--prompt", ""], None,
     "prompt 1 is empty"),
    ("non-utf8-prompt", ["generate", "--model", "{model}", "--prompt", b"\xff\xfe"], None,
     "prompt 0 is not valid UTF-8"),
    ("non-utf8-chat-prompt", ["generate", "--model", "{model}", "--chat", "--prompt", b"caf\xe9"], None,
     "prompt 0 is not valid UTF-8"),
    ("empty-chat-prompt", ["generate", "--model", "{model}", "--chat", "--prompt", ""], None, "prompt 0 is empty"),
    # device, parallelism, executor, dtype
    ("cuda-on-cpu", ["generate", "--model", "{model}", "--prompt", "hi", "--device", "cuda"], None,
     "device 'cuda' is not available"),
    ("unknown-device", ["generate", "--model", "{model}", "--prompt", "hi", "--device", "tpu"], None, "'tpu'"),
    ("tp-zero", [*GEN, "--model", "{model}", "--tp", "0"], None, "tensor_parallel_size must be a positive integer, got 0"),
    ("tp-negative", [*GEN, "--model", "{model}", "--tp", "-2"], None, "got -2"),
    ("tp-not-dividing-9-heads", [*GEN, "--model", "{model}", "--tp", "2"], None,
     "tensor-parallel size 2 does not divide num_attention_heads = 9"),
    ("tp-not-dividing-8-heads", [*GEN, "--model", "{tiny}", "--tp", "3", "--executor", "mp"], _unchanged,
     "tensor-parallel size 3 does not divide num_attention_heads = 8"),
    ("uni-with-tp", [*GEN, "--model", "{tiny}", "--tp", "2", "--executor", "uni"], _unchanged, "tensor_parallel_size=1 only"),
    ("unknown-executor", [*GEN, "--model", "{model}", "--executor", "warp"], None, "unknown executor 'warp'"),
    ("bad-dtype", [*GEN, "--model", "{model}", "--dtype", "int3"], None, "unknown dtype 'int3'"),
    ("max-num-seqs-zero", [*GEN, "--model", "{model}", "--max-num-seqs", "0"], None, "max_num_seqs"),
    ("ray-num-cpus-without-ray", [*GEN, "--model", "{model}", "--ray-num-cpus", "2"], None, "--ray-num-cpus"),
    ("ray-num-cpus-zero", [*GEN, "--model", "{model}", "--executor", "ray", "--ray-num-cpus", "0"], None,
     "--ray-num-cpus must be >= 1, got 0"),
    # sampling parameters
    ("max-tokens-zero", [*GEN, "--model", "{model}", "--max-tokens", "0"], None, "SamplingParams.max_tokens"),
    ("max-tokens-negative", [*GEN, "--model", "{model}", "--max-tokens", "-5"], None, "got -5"),
    ("temperature-negative", [*GEN, "--model", "{model}", "--temperature", "-1"], None, "SamplingParams.temperature"),
    ("temperature-nan", [*GEN, "--model", "{model}", "--temperature", "nan"], None, "SamplingParams.temperature"),
    ("top-p-zero", [*GEN, "--model", "{model}", "--top-p", "0"], None, "SamplingParams.top_p"),
    ("top-p-above-one", [*GEN, "--model", "{model}", "--top-p", "1.5"], None, "SamplingParams.top_p"),
    ("top-k-below-minus-one", [*GEN, "--model", "{model}", "--top-k", "-2"], None, "SamplingParams.top_k"),
    ("empty-stop", [*GEN, "--model", "{model}", "--stop", ""], None, "SamplingParams.stop"),
    ("negative-seed", [*GEN, "--model", "{model}", "--seed", "-1", "--temperature", "0.7"], None, "seed"),
    # the model directory and its checkpoint
    ("missing-model-dir", [*GEN, "--model", "{tmp}/nowhere"], None, "nowhere does not exist"),
    ("model-is-a-file", [*GEN, "--model", "{tiny}/config.json"], _unchanged, "is a file, not a directory"),
    ("no-config-json", [*GEN, "--model", "{tiny}"], _no_config, "has no config.json"),
    ("config-not-json", [*GEN, "--model", "{tiny}"], _config_not_json, "config.json is not valid JSON"),
    ("unsupported-model-type", [*GEN, "--model", "{tiny}"], _gpt2, "model_type 'gpt2' is not supported"),
    ("bin-only-checkpoint", [*GEN, "--model", "{tiny}"], _bin_only, "qshard reads safetensors only"),
    ("no-weights", [*GEN, "--model", "{tiny}"], _no_weights, "no *.safetensors files"),
    ("gptq-bits-5", [*GEN, "--model", "{tiny}"], _gptq_bits5, "bits=5 is not supported"),
    ("tensor-wrong-shape", [*GEN, "--model", "{tiny}", "--max-tokens", "1"], _up_proj_wrong_shape,
     "model.layers.0.mlp.up_proj.weight has shape [100, 64], expected [128, 64]"),
    ("config-disagrees-with-tensor", [*GEN, "--model", "{tiny}", "--max-tokens", "1"], _intermediate_disagrees,
     "gate_proj.weight has shape [128, 64], expected [96, 64]"),
    ("missing-tensor", [*GEN, "--model", "{tiny}", "--max-tokens", "1"], _missing_tensor,
     "model.layers.0.self_attn.k_proj.weight is missing"),
    ("truncated-safetensors", [*GEN, "--model", "{tiny}", "--max-tokens", "1"], _truncated, "truncated"),
    # other commands
    ("quantize-group-size-7", ["quantize", "--model", "{tiny}", "-o", "{tmp}/out", "--group-size", "7"], _unchanged,
     "group"),
    ("eval-ppl-missing-text", ["eval-ppl", "--model", "{model}", "--text", "{tmp}/missing.txt"], None, "missing.txt"),
    ("eval-ppl-window-1", ["eval-ppl", "--model", "{model}", "--window", "1"], None, "--window must be >= 2, got 1"),
    ("bench-throughput-tp-zero", ["bench", "throughput", "--tp", "0", "--out", "{tmp}/bench"], None,
     "--tp expects positive integers, got '0'"),
    ("bench-throughput-batch-words", ["bench", "throughput", "--batch", "one,two", "--out", "{tmp}/bench"], None,
     "--batch expects comma-separated integers"),
    ("bench-throughput-quant-without-shape", ["bench", "throughput", "--quant", "gptq-w4g128", "--out",
                                              "{tmp}/bench"], None, "--quant applies to --shape"),
    ("bench-kernels-layer", ["bench", "kernels", "--layers", "attn", "--json", ""], None, "--layers 'attn'"),
    ("bench-kernels-cuda", ["bench", "kernels", "--device", "cuda", "--json", ""], None, "--device cuda"),
    ("log-level", ["--log-level", "LOUD", *GEN], None, "--log-level 'LOUD'"),
]


def _arg(a, model_dir: Path, tiny_copy: Path | None, tmp: Path):
    if isinstance(a, bytes):
        return a  # passed to exec as raw argv bytes: Python sees them as surrogate escapes
    return a.format(model=model_dir, tiny=tiny_copy, tmp=tmp)


def _run_row(argv, setup, tiny: Path, model_dir: Path, tmp: Path) -> subprocess.CompletedProcess:
    tiny_copy = None
    if setup is not None:
        tiny_copy = tmp / "ckpt"
        shutil.copytree(tiny, tiny_copy)
        setup(tiny_copy)
    env = child_env()
    env.pop("QSHARD_DEBUG", None)
    return subprocess.run(CLI + [_arg(a, model_dir, tiny_copy, tmp) for a in argv], cwd=REPO, env=env,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def row_runs(request, tiny, model_dir, tmp_path_factory):
    """The selected rows' subprocesses, started together on a few threads (each is mostly an
    interpreter start, so the rows overlap well); a test waits for its own row's result."""
    selected = {item.callspec.id for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input_is_one_error_line"}
    pool = ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1)))
    futures = {row_id: pool.submit(_run_row, argv, setup, tiny, model_dir, tmp_path_factory.mktemp(row_id))
               for row_id, argv, setup, _ in ROWS if row_id in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("row_id, expected", [(r[0], r[3]) for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_error_line(row_id, expected, row_runs):
    proc = row_runs[row_id].result()
    stderr = proc.stderr.decode("utf-8", "replace")
    stdout = proc.stdout.decode("utf-8", "replace")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, f"exit {proc.returncode}\nstderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    assert expected in errors[0], errors[0]


def test_the_table_is_big_enough():
    assert len(ROWS) >= 25


def test_multiline_error_prints_its_first_line_only(capsys):
    """A WorkerFailure carries the failed rank's traceback after its first line."""
    from engine.executor.base import WorkerFailure
    from launch.cli import report_error

    assert report_error(WorkerFailure("rank 1 failed: boom\nTraceback (most recent call last):\n  x"), False) == 2
    assert capsys.readouterr().err == "error: rank 1 failed: boom\n"


def test_ctrl_c_prints_one_line_and_exits_130(model_dir):
    """SIGINT during a long TP=1 generation: `interrupted` on stderr, exit 130, no traceback."""
    env = child_env()
    proc = subprocess.Popen(CLI + ["generate", "--model", str(model_dir), "--executor", "uni", "--prompt", "Once",
                                   "--max-tokens", "4000", "--ignore-eos"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "loading" not in seen:  # the weights are being read: past imports and checks
            chunk = proc.stderr.read(1)
            assert chunk, f"exited early ({proc.wait()}): {seen}"
            seen += chunk
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = seen + rest
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.rstrip().splitlines()[-1] == "interrupted"


def test_debug_prints_the_traceback_too(model_dir):
    env = child_env(QSHARD_DEBUG="1")
    proc = subprocess.run(CLI + ["generate", "--model", str(model_dir), "--prompt", ""], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("error: prompt 0 is empty: give some text")


def test_os_fsencode_round_trip():
    """The non-UTF-8 rows rely on this: undecodable argv bytes reach Python as surrogate escapes."""
    assert os.fsdecode(b"\xff\xfe") == "\udcff\udcfe"
