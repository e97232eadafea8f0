"""`ray start --head` (loopback) + `ray job submit ... launch.ray_job`: the job's JSON output
equals the mp executor's tokens; the cluster is stopped afterwards (the ray_cluster fixture)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.launch.conftest import BIN, MAX_TOKENS, PROMPTS, REPO

# The job ships the checkout as its working dir; Ray honours .gitignore, and these keep whatever
# else a checkout holds (model caches, results) under the 100 MB upload limit.
RUNTIME_ENV = json.dumps({"working_dir": str(REPO), "excludes": ["*.safetensors", "*.gguf", ".git", "bench/results"]})


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_job_submit_generates_what_mp_gives(model_dir, reference, ray_cluster, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    out = tmp_path / "result.json"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--runtime-env-json", RUNTIME_ENV,
           "--", "python", "-m", "launch.ray_job", "--model", str(model_dir), "--tp", "3", "--dtype", "float32",
           "--prompts", str(prompts), "--max-tokens", str(MAX_TOKENS), "--out", str(out)]
    proc = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=360, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["ok"] and result["executor"] == "ray" and result["tp"] == 3
    assert [o["token_ids"] for o in result["outputs"]] == reference.mp_tokens
    assert [o["text"] for o in result["outputs"]] == reference.mp_texts
    assert [r["rank"] for r in result["ranks"]] == [0, 1, 2]
    assert len({r["pid"] for r in result["ranks"]}) == 3


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ray_job_failure_gives_a_failing_exit_code_and_json(ray_cluster, tmp_path):
    out = tmp_path / "result.json"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--runtime-env-json", RUNTIME_ENV,
           "--", "python", "-m", "launch.ray_job", "--model", str(tmp_path / "missing"), "--tp", "3",
           "--prompts", str(tmp_path / "missing.txt"), "--out", str(out)]
    proc = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode != 0
    result = json.loads(out.read_text())
    assert result["ok"] is False and "missing" in result["error"]
