"""`qshard bench throughput --num-prompts P`: the offline engine on bench serve's mixed-length
prompts prints its table and offline.json with every prompt's tokens counted, and HF transformers'
generate on the same prompts as its baseline."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.launch.conftest import BIN, child_env

pytestmark = pytest.mark.slow


def test_num_prompts_runs_the_mixed_prompts_offline(model_dir, tmp_path):
    from launch.bench_prompts import LENGTHS_WORDS, mixed_prompts

    proc = subprocess.run([str(BIN / "qshard"), "bench", "throughput", "--num-prompts", "5", "--output-len", "4",
                           "--tp", "1", "--dtype", "float32", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "offline.json").read_text())
    assert result["num_prompts"] == 5 and result["output_tokens"] == 5 * 4  # ignore_eos: every token generated
    assert result["prompt_tokens"] > sum(LENGTHS_WORDS)  # one prompt of each length, >= a token per word
    assert result["output_tokens_per_s"] > 0 and "output tokens/s" in proc.stdout
    assert [r["batch"] for r in result["hf"]] == [8, 32, 64] and all(r["prompts"] == 5 for r in result["hf"])
    best = max(r["output_tokens_per_s"] for r in result["hf"])
    assert result["vs_hf_best"] == pytest.approx(result["output_tokens_per_s"] / best)
    assert "qshard / HF at batch" in proc.stdout
    prompts = mixed_prompts(5)
    assert [len(p.split()) for p in prompts] == list(LENGTHS_WORDS) and mixed_prompts(5) == prompts
