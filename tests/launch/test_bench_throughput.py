"""`qshard bench throughput`: the CPU scaling table with the HF baseline, JSON and PNG; the same
bench on several GPUs (skipped without them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch.conftest import child_env

BENCH = [sys.executable, "-m", "launch.cli", "--log-level", "WARNING", "bench", "throughput"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cpu_table_json_and_png_with_hf_ratio(model_dir, tmp_path):
    cmd = BENCH + ["--model", str(model_dir), "--tp", "1,3", "--batch", "2", "--input-len", "16",
                   "--output-len", "8", "--dtype", "float32", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| float32 | - | HF | 2 |" in proc.stdout and "| float32 | auto sync | 3 | 2 |" in proc.stdout
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["tp"], r["batch"]): r for r in report["results"]}
    assert sorted(rows) == [(1, 2), (3, 2)]
    layers = 30
    for (tp, batch), r in rows.items():
        assert r["tokens"] == 8 * batch and r["tokens_per_s"] > 0
        assert r["steps"] == 8  # one prefill + 7 decode steps
        assert r["ratio_vs_hf"] > 0 and r["speedup_vs_tp1"] > 0
        assert len(r["ranks"]) == tp and all(x["peak_memory_mib"] > 50 for x in r["ranks"])
        if tp == 3:  # two all-reduces a layer and one for the embedding, every step
            assert all(x["all_reduce_calls_per_step"] == 2 * layers + 1 for x in r["ranks"])
            assert r["all_reduce_ms_per_step"] > 0
        else:
            assert r["all_reduce_ms_per_step"] == 0
    # greedy float32: every TP size generates the same tokens
    assert rows[(1, 2)]["tokens_digest"] == rows[(3, 2)]["tokens_digest"]
    assert {h["batch"] for h in report["hf"]} == {2}


@pytest.mark.slow
def test_dummy_shape_needs_no_checkpoint(tmp_path):
    cmd = BENCH + ["--shape", "tiny", "--tp", "1", "--batch", "2", "--input-len", "8", "--output-len", "4",
                   "--hf", "off", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["config"]["load_format"] == "dummy" and report["results"][0]["tokens"] == 8
    assert not list(tmp_path.glob("model-tiny-none/*.safetensors"))


@pytest.mark.cuda
@pytest.mark.multigpu
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("executor", ["mp", "torchrun", "ray"])
def test_multigpu_scaling_on_llama2_7b_shape(tmp_path, executor):
    import torch

    tps = [t for t in (1, 2, 4, 8) if t <= torch.cuda.device_count()]
    cmd = BENCH + ["--shape", "llama-2-7b", "--quant", "none", "--tp", ",".join(map(str, tps)), "--batch", "1,32",
                   "--input-len", "128", "--output-len", "64", "--executor", executor, "--out", str(tmp_path)]
    if executor == "ray":
        cmd += ["--ray-num-cpus", str(max(tps))]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    rows = {(r["tp"], r["batch"]): r for r in report["results"]}
    # weights split: each rank holds about 1/TP of the model (fp16 7B: ~13.5 GB at TP=1)
    top = max(tps)
    assert rows[(top, 1)]["peak_memory_mib_max"] < rows[(1, 1)]["peak_memory_mib_max"] / top * 1.5
    # batch 1 decode is memory-bound: TP must help
    assert rows[(top, 1)]["speedup_vs_tp1"] > 1.2
