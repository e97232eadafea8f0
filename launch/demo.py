"""`make demo`: the default model GPTQ-quantized once, then served tensor-parallel over 3 local ranks.

Each rank reads only its shard of the packed GPTQ tensors (qweight, scales, qzeros, g_idx); the
ranks join their partial sums with all-reduce (gloo on CPU, NCCL on GPUs). On CPU the bf16 int4
path (torch's packed weight-only matmul) runs the quantized linears.

Prints one line per stage (model, quantization, loading, generation) and the answers; the
per-layer GPTQ table stays with `qshard quantize --report`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine import LLM, SamplingParams
from engine.default_model import DEFAULT_MODEL_NAME, cache_dir, prepare_default

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying healthy.",
]
# 4-bit, group 64 (128 does not divide the hidden size 576), symmetric (GPTQ v1, what every engine
# reads), columns visited in activation order with groups kept in column order ("weight"): on this
# model perplexity 29.3 against 31.5 without act-order and 24.2 in float (bench/results/quantization-ppl.md).
QUANTIZE_ARGS = ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--act-order", "weight",
                 "--format", "gptq", "--samples", "64", "--seqlen", "256"]


def quantized_default_dir() -> Path:
    return cache_dir() / f"{DEFAULT_MODEL_NAME}-gptq-w4g64"


def stage(text: str) -> None:
    print(text, flush=True)


def prepare_quantized_default() -> Path:
    """The default model quantized with qshard's GPTQ, made once (atomically, by `qshard quantize`)
    next to the float one."""
    source = prepare_default()
    stage(f"[1/4] float model: {source}")
    target = quantized_default_dir()
    if (target / "config.json").exists():
        stage(f"[2/4] GPTQ 4-bit g64 model: {target} (made earlier)")
        return target
    from launch import cmd_quantize

    stage(f"[2/4] quantizing with GPTQ 4-bit g64 into {target} (once, a few minutes on CPU) ...")
    parser = argparse.ArgumentParser()
    cmd_quantize.add_arguments(parser)
    # --overwrite: the target is this cache's own directory and holds no complete checkpoint
    cmd_quantize.run(parser.parse_args(["--model", str(source), "-o", str(target), "--overwrite", *QUANTIZE_ARGS]))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="activation dtype (bfloat16: the CPU int4 kernels)")
    parser.add_argument("--float", dest="quantized", action="store_false", help="serve the float model instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quantized:
        model = prepare_quantized_default()
    else:
        model = prepare_default()
        stage(f"[1/4] float model: {model}\n[2/4] not quantized (--float)")
    stage(f"[3/4] loading {model.name} over {args.tp} tensor-parallel ranks ...")
    with LLM(model, tensor_parallel_size=args.tp, executor="mp", dtype=args.dtype) as llm:
        stage(f"[4/4] generating answers to {len(PROMPTS)} prompts ...")
        start = time.perf_counter()
        outputs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                           SamplingParams(max_tokens=args.max_tokens, temperature=0))
        elapsed = time.perf_counter() - start
        for prompt, out in zip(PROMPTS, outputs):
            print(f"\n### {prompt}\n{out.text.strip()}")
        tokens = sum(len(o.token_ids) for o in outputs)
        quant = llm.model_config.quantization_config or {}
        print(f"\nmodel={model.name} quant={quant.get('quant_method', 'none')} tp={args.tp} executor=mp "
              f"dtype={str(llm.config.dtype).replace('torch.', '')} tokens={tokens} time={elapsed:.2f}s "
              f"throughput={tokens / elapsed:.1f} tokens/s")
    return 0


def run_demo(argv: list[str] | None = None) -> int:
    """main(), with qshard's own errors printed as one `error:` line (exit 2), as the CLI does."""
    from kernels.errors import QShardError
    from launch.cli import debug_requested, report_error

    try:
        return main(argv)
    except QShardError as e:
        return report_error(e, debug_requested())


if __name__ == "__main__":
    sys.exit(run_demo())
