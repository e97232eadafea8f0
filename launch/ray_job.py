"""Entrypoint for Ray jobs: generation (or a throughput measurement) on the job's cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m launch.ray_job --model M --tp N --prompts FILE --out FILE
    ... -- python -m launch.ray_job --throughput --model M --tp N --batch 1,8 --out FILE

The driver runs inside the job and joins the job's cluster (RAY_ADDRESS); ranks are Ray actors
(launch.ray_executor). Results are written as JSON to --out (give an absolute path: the job's
working directory is a temporary copy). The exit code is 0 only when everything succeeded; on
failure the JSON holds {"ok": false, "error": ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

logger = logging.getLogger("launch.ray_job")


def read_prompts(path: str) -> list:
    """One prompt per line of a text file, or a JSON list of strings / token-id lists."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not prompts:
            raise ValueError(f"{path}: expected a non-empty JSON list of prompts")
        return prompts
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.ray_job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON result file (absolute path)")
    p.add_argument("--prompts", help="prompt file: one per line, or a .json list")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="apply the chat template to each prompt")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--placement-strategy", default="PACK", help="PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    p.add_argument("--ray-address", default=None, help="default: the job's cluster")
    p.add_argument("--throughput", action="store_true", help="measure tokens/s instead (token-id prompts)")
    p.add_argument("--batch", default="1,8,32", help="throughput: batch sizes")
    p.add_argument("--input-len", type=int, default=128, help="throughput: prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="throughput: generated tokens")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--log-level", default="INFO")
    return p


def generate(args) -> dict:
    from engine import LLM, SamplingParams

    prompts = read_prompts(args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    with LLM(args.model, tensor_parallel_size=args.tp, executor="ray", dtype=args.dtype, device=args.device,
             progress=False, load_format=args.load_format, ray_address=args.ray_address,
             placement_strategy=args.placement_strategy) as llm:
        ranks = [{"rank": r, "ip": i["ip"], "pid": i["pid"], "node_id": i["node_id"]}
                 for r, i in enumerate(llm.executor.infos)]
        start = time.perf_counter()
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        dtype = str(llm.config.dtype).replace("torch.", "")
    tokens = sum(len(o.token_ids) for o in outs)
    return {"mode": "generate", "model": str(args.model), "tp": args.tp, "executor": "ray", "dtype": dtype,
            "ranks": ranks, "elapsed_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "outputs": [{"prompt": p, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                        for p, o in zip(prompts, outs)]}


def throughput(args) -> dict:
    from launch.bench_throughput import _ints
    from launch.throughput_measure import measure_qshard

    result = measure_qshard(args.model, tp=args.tp, executor="ray", dtype=args.dtype, device=args.device,
                            batches=_ints(args.batch), input_len=args.input_len, output_len=args.output_len,
                            load_format=args.load_format,
                            executor_options={"ray_address": args.ray_address,
                                              "placement_strategy": args.placement_strategy})
    for row in result["rows"]:
        print(f"tp={args.tp} batch={row['batch']}: {row['tokens_per_s']:.1f} tokens/s, "
              f"all-reduce {row['all_reduce_ms_per_step']:.2f} ms/step")
    return {"mode": "throughput", **result}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        if not args.throughput and not args.prompts:
            raise ValueError("--prompts is required (or --throughput)")
        result = {"ok": True, **(throughput(args) if args.throughput else generate(args))}
        code = 0
    except Exception as e:
        logger.error("ray job failed: %s", e)
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        code = 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if code == 0 and result.get("mode") == "generate":
        for o in result["outputs"]:
            print(f"### prompt: {o['prompt']}\n{o['text']}\n")
    logger.info("wrote %s", out)
    return code


if __name__ == "__main__":
    sys.exit(main())
