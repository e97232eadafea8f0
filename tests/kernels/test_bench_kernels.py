"""`qshard bench kernels` runs on CPU, prints its table and writes JSON (no timing asserted)."""

from __future__ import annotations

import argparse
import json

from kernels import cpu_amx
from launch import bench_kernels


def test_bench_kernels_runs_on_cpu(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_kernels.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--models", "square-2048", "--formats", "gptq4", "int8", "--m", "1",
                              "--hot", "--min-time", "0.005", "--json", str(out)])
    assert bench_kernels.run(args) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and "xbf16" in printed and "xfp32" in printed
    rows = json.loads(out.read_text())["rows"]
    amx = cpu_amx.available() is None
    assert [(r["format"], r["M"], r["backend"]) for r in rows] == [("gptq4", 1, "cpu-amx" if amx else "cpu-int4"),
                                                                   ("int8", 1, "cpu-amx" if amx else "cpu-int8")]
    for r in rows:
        assert r["time_us"] > 0 and r["gbs"] > 0 and r["vs_bf16"] > 0 and r["vs_fp32"] > 0 and r["vs_dequant_mm"] > 0
