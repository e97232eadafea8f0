"""`qshard` command line. Each subcommand lives in its own module with add_arguments / run."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from kernels.errors import QShardError

# subcommand -> (module, help); `bench` has its own sub-subcommands
COMMANDS = {
    "prepare-default": ("launch.cmd_prepare", "convert the embedded default model (SmolLM2-135M) once"),
    "generate": ("launch.cmd_generate", "generate text from prompts"),
    "serve": ("launch.cmd_serve", "OpenAI-compatible HTTP server (completions, chat, streaming, /metrics)"),
    "quantize": ("launch.cmd_quantize", "quantize a float checkpoint with GPTQ or RTN (GPTQ / compressed-tensors out)"),
    "write-random": ("launch.cmd_write_random", "write a random-weight checkpoint of a named shape (benchmarks)"),
    "eval-ppl": ("launch.cmd_eval_ppl", "perplexity of models on a text (stride windows, engine prompt logprobs)"),
}
BENCH = {
    "kernels": ("launch.bench_kernels", "quantized matmul kernels vs dense baselines"),
    "throughput": ("launch.bench_throughput", "tokens/s across tensor-parallel sizes and executors, vs HF transformers"),
    "serve": ("launch.bench_serve", "concurrent streaming clients against a running qshard serve: TTFT, ITL, tokens/s"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qshard", description="tensor-parallel, quantization-native LLM inference")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error too (also QSHARD_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        _add(p, module)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCH.items():
        p = bench.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        _add(p, module)
    return parser


def _add(p: argparse.ArgumentParser, module: str) -> None:
    try:
        importlib.import_module(module).add_arguments(p)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        p.set_defaults(_missing=module)


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("QSHARD_DEBUG", "") not in ("", "0")


def report_error(error: BaseException, debug: bool) -> int:
    """qshard's own errors as one `error:` line (exit 2); with debug, the traceback first."""
    if debug:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    # only the first line: a WorkerFailure carries the failed rank's traceback after it
    message = " ".join(str(error).strip().split("\n")[0].split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)  # imports every command: Ctrl-C may land here too
        level = str(args.log_level).upper()
        if level not in LOG_LEVELS:
            print(f"error: --log-level {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
            return 2
        logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if getattr(args, "_missing", None):
            print(f"error: {args._missing} is not available in this build", file=sys.stderr)
            return 2
        return int(importlib.import_module(args._module).run(args) or 0)
    except QShardError as e:
        return report_error(e, debug_requested(args))
    except KeyboardInterrupt:
        # the executors stop their ranks on the way out (their own shutdown); one line, no traceback
        if debug_requested(args):
            import traceback

            traceback.print_exc(file=sys.stderr)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
