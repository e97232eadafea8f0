"""Per-rank memory when loading a quantized checkpoint with tensor parallelism: a ~250 MB GPTQ
w4g128 checkpoint (bench/rank_memory.py's "small" shape, 8 layers) at TP=4 on CPU. Each rank's
peak RSS stays under its baseline (a rank that loads a tiny checkpoint) + its share of the
checkpoint + 300 MB; the ~1 GB run is in bench/results/rank-memory.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch.conftest import REPO, child_env

BOUND_MB = 300


@pytest.mark.timeout(300)
def test_each_rank_peak_rss_stays_under_its_share_plus_300mb(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "bench" / "rank_memory.py"), "--shape", "small", "--layers", "8", "--tp", "4",
           "--work-dir", str(tmp_path), "--json", str(out)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=280)
    print(proc.stdout)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert 230 < report["checkpoint_mb"] < 260 and report["tp"] == 4 and report["dtype"] == "bfloat16"
    assert report["generated_tokens"] == 2  # the loaded TP=4 model runs
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    for r in ranks:
        # each rank read about its quarter (norms are replicated, KV heads split evenly)
        assert r["share_mb"] <= r["read_mb"] < r["share_mb"] + 5, r
        assert r["peak_mb"] > r["baseline_mb"] + r["share_mb"], r  # the weights really are resident
        # measured: +30 .. +74 MB over runs (share 61 MB, baseline ~236 MB, peak ~330-370 MB); before the load
        # stopped holding the packed layout and the checkpoint's mapped pages, and converting
        # whole tensors at once, +286 .. +303 MB (and +930 MB for the ~1 GB checkpoint)
        assert r["excess_mb"] < BOUND_MB, r
    assert proc.returncode == 0, proc.stderr[-3000:]
