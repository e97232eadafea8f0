"""Per-rank peak memory of loading a quantized checkpoint with tensor parallelism (CPU, mp executor).

    python bench/rank_memory.py                                   # ~1 GB: Llama-2-7B shape, 5 layers, TP=4
    python bench/rank_memory.py --shape small --layers 8 --tp 4 --json out.json     # ~250 MB

Writes a real checkpoint to a temporary directory: safetensors files of GPTQ v1 symmetric 4-bit
group-128 layers (valid random codes, zeros and scales from engine.dummy) and float16 embeddings,
head and norms. Loads it in a fresh process with LLM(tensor_parallel_size=tp, executor="mp",
dtype=bfloat16, so the packed cpu-int4 backend, not a dequantized copy) and reads every rank's
peak resident set size (VmHWM) through the executor's stats. The same with a tiny checkpoint
gives each rank's baseline: python, torch, the engine and its process group, no weights to
speak of (rank 0 is the driver process itself). A rank's share is the checkpoint's bytes / tp
(embeddings and head are vocab-parallel; only norms are replicated).

Prints: rank, share MB, read MB (bytes the rank read from the checkpoint), baseline MB, peak MB,
and the excess peak - baseline - share, which the issue bounds by 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

MB = 1 << 20
BOUND_MB = 300
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}
# "small": a TinyLlama-like layer (hidden 2048, GQA 16/4, intermediate 5632) with a 8K vocabulary,
# ~23 MB of GPTQ per layer.
SMALL = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 4,
         "vocab_size": 8192, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def model_config(shape: str, layers: int) -> dict:
    from engine.dummy import SHAPES

    if shape == "7b":
        cfg = dict(SHAPES["llama-2-7b"])
    elif shape == "small":
        cfg = dict(SHAPES["llama-2-7b"], **SMALL)
    elif shape == "tiny":
        cfg = dict(SHAPES["tiny"])
    else:
        raise ValueError(f"unknown shape {shape!r}; choose 7b, small or tiny")
    cfg.update(num_hidden_layers=layers, torch_dtype="float16", quantization_config=dict(GPTQ))
    return cfg


def write_checkpoint(out_dir: Path, config: dict, max_file_bytes: int = 256 * MB) -> int:
    """config.json + safetensors files (with an index) of random valid tensors; returns the bytes
    of tensor data written."""
    from launch.cmd_write_random import write_tensors

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return write_tensors(out_dir, "float16", max_file_bytes, progress=False)


def measure(model_dir: Path, tp: int, dtype: str) -> list[dict]:
    """Load in a fresh process; each rank's stats right after loading."""
    proc = subprocess.run([sys.executable, __file__, "--measure", str(model_dir), "--tp", str(tp), "--dtype", dtype],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {model_dir} at TP={tp} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_child(model_dir: str, tp: int, dtype: str) -> None:
    from engine import LLM, SamplingParams

    start = time.perf_counter()
    with LLM(model_dir, tensor_parallel_size=tp, executor="mp", dtype=dtype, device="cpu", progress=False,
             max_model_len=64) as llm:
        load_s = time.perf_counter() - start
        stats = llm.executor.collect_stats()  # lifetime peaks: the load is all that ran
        # the loaded model runs (random weights: the tokens mean nothing)
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    rows = [{"rank": s["rank"], "pid": s["pid"], "peak": s["peak_memory_bytes"], "rss": s["memory_bytes"],
             "read": s["weight_bytes_read"], "load_s": load_s, "tokens": len(out[0].token_ids)} for s in stats]
    print(json.dumps(sorted(rows, key=lambda r: r["rank"])))


def run(shape: str, layers: int, tp: int, dtype: str = "bfloat16", work_dir: Path | None = None) -> dict:
    """Write the checkpoint and a tiny one, measure both; the report as a dict."""
    with tempfile.TemporaryDirectory(prefix="rank-memory-", dir=work_dir) as tmp:
        t = time.perf_counter()
        total = write_checkpoint(Path(tmp) / "model", model_config(shape, layers))
        write_s = time.perf_counter() - t
        write_checkpoint(Path(tmp) / "tiny", model_config("tiny", 2))
        baseline = measure(Path(tmp) / "tiny", tp, dtype)
        loaded = measure(Path(tmp) / "model", tp, dtype)
    share = total / tp
    ranks = []
    for b, m in zip(baseline, loaded):
        ranks.append({"rank": m["rank"], "share_mb": share / MB, "read_mb": m["read"] / MB,
                      "baseline_mb": b["peak"] / MB, "peak_mb": m["peak"] / MB, "rss_after_load_mb": m["rss"] / MB,
                      "excess_mb": (m["peak"] - b["peak"] - share) / MB})
    return {"shape": shape, "layers": layers, "tp": tp, "dtype": dtype, "checkpoint_mb": total / MB,
            "write_s": write_s, "load_s": loaded[0]["load_s"], "generated_tokens": loaded[0]["tokens"],
            "bound_mb": BOUND_MB, "ranks": ranks}


def table(report: dict) -> str:
    lines = [f"checkpoint {report['checkpoint_mb']:.0f} MB ({report['shape']} shape, {report['layers']} layers, "
             f"GPTQ w4g128), TP={report['tp']}, {report['dtype']}, load {report['load_s']:.1f} s",
             "| rank | share MB | read MB | baseline MB | peak MB | peak - baseline - share MB |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in report["ranks"]:
        lines.append(f"| {r['rank']} | {r['share_mb']:.0f} | {r['read_mb']:.0f} | {r['baseline_mb']:.0f} | "
                     f"{r['peak_mb']:.0f} | {r['excess_mb']:+.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b", choices=["7b", "small"])
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--work-dir", type=Path, default=None, help="where the temporary checkpoints go")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.measure:
        _measure_child(args.measure, args.tp, args.dtype)
        return 0
    os.environ.setdefault("TQDM_DISABLE", "1")
    report = run(args.shape, args.layers, args.tp, args.dtype, args.work_dir)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    worst = max(r["excess_mb"] for r in report["ranks"])
    print(f"worst excess {worst:+.0f} MB (bound {BOUND_MB} MB): {'OK' if worst < BOUND_MB else 'OVER'}")
    return 0 if worst < BOUND_MB else 1


if __name__ == "__main__":
    sys.exit(main())
