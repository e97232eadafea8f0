"""`qshard bench throughput`: generation throughput across tensor-parallel sizes.

    qshard bench throughput --tp 1,2,4 --executor mp|ray|torchrun [--batch 1,8,32]
    qshard bench throughput --shape llama-2-7b --quant gptq-w4g128 --tp 1,2   # random weights

For each dtype and TP size a fresh process (mp, ray) or torchrun job measures tokens/s at each
batch size, per-rank peak memory (RSS on CPU, max allocated on CUDA) and time in all-reduce per
step (an opt-in timer in parallel.collectives); another process runs HF transformers' generate
on the same prompts and batch sizes as the baseline (real checkpoints, and unquantized dummy
shapes that fit). Results: a table on stdout, `throughput.json` and `throughput.png` in --out.

Under torchrun (`torchrun -m launch.torchrun bench throughput ...`) the same arguments measure
the one TP size torchrun started.

    qshard bench throughput --shape llama-2-7b --quant gptq-w4g128 --executor uni --kernels torch,auto

`--kernels` lists engine kernel paths for the layers' non-matmul work, each one configuration
(torch,auto: before and after in one run). In-process (--executor uni) on CUDA every row also
breaks the decode step down (launch/step_breakdown.py): the graph's GPU time, its quantized and
dense matmuls, attention and other kernels, GPU work outside the graph, the host gap, and the
bandwidth floor with the share reached; the table prints it below the throughput table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EXECUTORS = ("mp", "ray", "torchrun", "uni", "external")


def _ints(text: str, flag: str = "--tp/--batch") -> list[int]:
    from kernels.errors import InputError

    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InputError(f"{flag} expects positive integers, got {text!r}")
    return values


def check_arguments(args) -> None:
    """Refuse bad flags (one `error:` line) before any directory is made or process started."""
    from engine.config import parse_dtype
    from engine.devices import resolve_device
    from kernels.errors import InputError

    _ints(args.tp, "--tp")
    _ints(args.batch, "--batch")
    for flag, value in (("--input-len", args.input_len), ("--output-len", args.output_len),
                        ("--ray-num-cpus", args.ray_num_cpus)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if not args.config_timeout > 0:
        raise InputError(f"--config-timeout must be > 0 seconds, got {args.config_timeout}")
    for name in args.dtype.split(","):
        if name.strip() not in ("", "auto"):
            parse_dtype(name.strip())
    resolve_device(args.device, max(_ints(args.tp, "--tp")), args.executor)
    if args.quant != "none" and not args.shape:
        raise InputError("--quant applies to --shape (random weights); a checkpoint's own quantization is used")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF model directory, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--shape", help="random weights of a named shape instead (llama-2-7b, llama-2-70b, llama-3-8b, "
                                   "...); implies --load-format dummy")
    p.add_argument("--quant", default="none", help="with --shape: none, gptq-w4g128 or awq-w4g128")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: random weights of the model's shapes, made in place (no checkpoint read)")
    p.add_argument("--tp", default="1", help="comma-separated tensor-parallel sizes (default 1)")
    p.add_argument("--executor", default="mp", choices=EXECUTORS, help="how ranks are launched (default mp)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per sequence (default 128)")
    p.add_argument("--dtype", default="auto", help="comma-separated: auto, float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--hf", default="auto", choices=("auto", "on", "off"),
                   help="measure HF transformers' generate too (auto: when the model fits)")
    p.add_argument("--out", default="bench-out/throughput", help="directory for throughput.json and .png")
    p.add_argument("--ray-address", default=None, help="ray executor: cluster address (default: a local one)")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="ray executor: CPUs of the local cluster")
    p.add_argument("--kernels", default="auto",
                   help="comma-separated engine kernel paths for the layers' non-matmul work: auto, torch, triton "
                        "(each one a configuration: e.g. torch,auto gives before/after in one run)")
    p.add_argument("--async-scheduling", default="auto",
                   help="comma-separated: auto, on, off (each one configuration; auto: on for one rank on CUDA)")
    p.add_argument("--eager", action="store_true",
                   help="CUDA: no graph replay (every all-reduce is then timed; replayed steps are not)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-prompts", type=int, default=None,
                   help="instead: P mixed-length prompts (bench serve's) through one offline generate (bench_offline)")
    p.add_argument("--config-timeout", type=float, default=3600, help="seconds allowed per measurement")
    p.add_argument("--measure", metavar="JSON", help=argparse.SUPPRESS)  # one configuration, in-process
    p.add_argument("--measure-hf", metavar="JSON", help=argparse.SUPPRESS)


# -- one configuration (child processes, torchrun ranks) --------------------------------------------


def _executor_options(args) -> dict:
    """LLM keyword arguments beyond the common ones (executor options, eager mode)."""
    opts = {"cuda_graphs": False} if args.eager else {}
    if args.async_scheduling != "auto":
        opts["async_scheduling"] = args.async_scheduling == "on"
    if args.executor == "ray":
        opts.update(ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus, log_to_driver=False)
    return opts


def _measure_here(args) -> dict | None:
    from launch.throughput_measure import measure_qshard

    (tp,) = _ints(args.tp)
    return measure_qshard(args.model, tp=tp, executor=args.executor, dtype=args.dtype, device=args.device,
                          batches=_ints(args.batch), input_len=args.input_len, output_len=args.output_len,
                          seed=args.seed, load_format=args.load_format, executor_options=_executor_options(args),
                          kernels=args.kernels)


def _measure_cmd(args) -> int:
    result = _measure_here(args)
    if result is not None:  # rank 0
        Path(args.measure).write_text(json.dumps(result))
    return 0


def _measure_hf_cmd(args) -> int:
    from launch.throughput_measure import measure_hf

    result = measure_hf(args.model, dtype=args.dtype, device=args.device, batches=_ints(args.batch),
                        input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                        load_format=args.load_format)
    Path(args.measure_hf).write_text(json.dumps(result))
    return 0


# -- orchestration ------------------------------------------------------------------------------------


def _model_dir(args, out: Path) -> tuple[str, str]:
    if args.shape:
        from engine.dummy import write_config

        return str(write_config(args.shape, args.quant, out / f"model-{args.shape}-{args.quant}")), "dummy"
    from engine.llm import resolve_model_path

    return str(resolve_model_path(args.model)), args.load_format


def _machine(device: str) -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": sys.version.split()[0],
            "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


def _child(cmd: list[str], result: Path, timeout_s: float, what: str) -> dict:
    from launch.ray_cluster import NO_MULTICAST_ENV

    env = {**os.environ, **NO_MULTICAST_ENV}
    logger.info("measuring %s", what)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no result within {timeout_s:.0f}s") from None
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
        raise RuntimeError(f"{what}: exit code {proc.returncode}\n{tail}")
    logger.info("%s done in %.0fs", what, time.perf_counter() - start)
    return json.loads(result.read_text())


def _common(args, model_dir: str, load_format: str, device: str, dtype: str) -> list[str]:
    out = ["--model", model_dir, "--load-format", load_format, "--device", device, "--dtype", dtype,
           "--batch", args.batch, "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--seed", str(args.seed)]
    if args.ray_address:
        out += ["--ray-address", args.ray_address]
    if args.ray_num_cpus:
        out += ["--ray-num-cpus", str(args.ray_num_cpus)]
    if args.eager:
        out += ["--eager"]
    return out


def _kernel_paths(args) -> list[str]:
    from engine.layers.kernel_choice import KERNELS
    from kernels.errors import InputError

    paths = [k.strip() for k in args.kernels.split(",") if k.strip()]
    bad = [k for k in paths if k not in KERNELS]
    if not paths or bad:
        raise InputError(f"--kernels takes a comma-separated list of {', '.join(KERNELS)}, got {args.kernels!r}")
    return list(dict.fromkeys(paths))


def _async_modes(args) -> list[str]:
    from kernels.errors import InputError

    modes = [m.strip() for m in args.async_scheduling.split(",") if m.strip()]
    if not modes or any(m not in ("auto", "on", "off") for m in modes):
        raise InputError(f"--async-scheduling takes a comma-separated list of auto, on, off, got "
                         f"{args.async_scheduling!r}")
    return list(dict.fromkeys(modes))


def _orchestrate(args) -> int:
    import torch

    from engine.config import ModelConfig
    from engine.llm import resolve_dtype
    from launch.throughput_report import add_ratios, plot, table, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, load_format = _model_dir(args, out)
    cfg = ModelConfig.from_dir(model_dir)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = list(dict.fromkeys(str(resolve_dtype(d.strip(), cfg, device)).replace("torch.", "")
                                for d in args.dtype.split(",") if d.strip()))
    tps, _ = _ints(args.tp), _ints(args.batch)
    kernel_paths, async_modes = _kernel_paths(args), _async_modes(args)
    report = {"config": {"model": Path(model_dir).name, "model_dir": model_dir, "load_format": load_format,
                         "shape": args.shape, "quant": args.quant, "executor": args.executor, "device": device,
                         "tp": tps, "batches": _ints(args.batch), "dtypes": dtypes, "input_len": args.input_len,
                         "output_len": args.output_len, "seed": args.seed, "kernels": kernel_paths,
                         "async_scheduling": async_modes},
              "machine": _machine(device), "results": [], "runs": [], "hf": [], "hf_skipped": {}, "failures": []}
    tmp = Path(tempfile.mkdtemp(prefix="qshard-bench-"))
    me = [sys.executable, "-m", "launch.bench_throughput"]
    for dtype in dtypes:
        common = _common(args, model_dir, load_format, device, dtype)
        if args.hf != "off":
            path = tmp / f"hf-{dtype}.json"
            try:
                hf = _child(me + common + ["--measure-hf", str(path)], path, args.config_timeout, f"HF {dtype}")
            except RuntimeError as e:
                if args.hf == "on":
                    raise
                hf = {"skipped": str(e).splitlines()[0]}
            if "skipped" in hf:
                report["hf_skipped"][dtype] = hf["skipped"]
            else:
                report["hf"] += [{**r, "dtype": dtype} for r in hf["rows"]]
                report["hf_transformers"] = hf.get("transformers")
        for kernels, mode, tp in [(k, a, t) for k in kernel_paths for a in async_modes for t in tps]:
            path = tmp / f"qshard-{dtype}-{kernels}-async-{mode}-tp{tp}.json"
            config = ["--kernels", kernels, "--async-scheduling", mode, "--measure", str(path)]
            if args.executor == "torchrun":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
                       "-m", "launch.torchrun", "--log-level", "WARNING", "bench", "throughput", *common, *config]
            else:
                cmd = me + common + ["--tp", str(tp), "--executor", args.executor, *config]
            try:
                run = _child(cmd, path, args.config_timeout, f"qshard tp={tp} {dtype} kernels={kernels} "
                                                             f"async={mode} ({args.executor})")
            except RuntimeError as e:
                logger.error("%s", e)
                report["failures"].append(str(e).splitlines()[0])
                continue
            report["runs"].append({k: v for k, v in run.items() if k != "rows"})
            report["results"] += [{**r, "dtype": run["dtype"], "executor": run["executor"]} for r in run["rows"]]
    report["machine"]["loadavg_end"] = os.getloadavg()
    add_ratios(report)
    text = table(report)
    print(text)
    write_json(report, out / "throughput.json")
    (out / "throughput.md").write_text(text)
    plot(report, out / "throughput.png")
    print(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'}")
    return 0 if report["results"] and not report["failures"] else 1


def _spmd(args) -> int:
    """Under torchrun without --measure: measure the one TP size, rank 0 reports."""
    from launch.throughput_report import add_ratios, plot, table, write_json

    result = _measure_here(args)
    if result is None:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": {"model": Path(args.model).name, "executor": "torchrun", "device": result["device"],
                         "input_len": args.input_len, "output_len": args.output_len, "tp": [result["tp"]]},
              "machine": {**_machine(result["device"]), "loadavg_end": os.getloadavg()},
              "results": [{**r, "dtype": result["dtype"], "executor": "torchrun"} for r in result["rows"]],
              "runs": [{k: v for k, v in result.items() if k != "rows"}], "hf": [], "failures": []}
    add_ratios(report)
    print(table(report))
    write_json(report, out / "throughput.json")
    plot(report, out / "throughput.png")
    return 0


def run(args) -> int:
    check_arguments(args)
    if args.num_prompts is not None:
        from launch.bench_offline import run as run_offline

        return run_offline(args)
    if args.measure_hf:
        return _measure_hf_cmd(args)
    if args.measure:
        return _measure_cmd(args)
    if args.executor == "external":
        if args.model == "default" or args.shape:
            args.model, args.load_format = _model_dir(args, Path(args.out))
        return _spmd(args)
    return _orchestrate(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
