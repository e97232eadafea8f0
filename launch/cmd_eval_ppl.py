"""`qshard eval-ppl`: perplexity of one or more models on a text, through the engine itself.

    qshard eval-ppl --model M [--model M2 ...] --text FILE --tp N --window 1024 --stride 512

The text is tokenized once and cut into windows of `window` tokens starting every `stride`
tokens; each window is scored in one prefill (SamplingParams(prompt_logprobs=True)) and only the
tokens that the previous window did not score count, so every token after the first is scored
exactly once, with at least window - stride tokens of context (stride = window: disjoint
windows, as GPTQ's evaluation, each window's first token unscored). One line per model; the last line
is `perplexity: X` (of the last model given).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

from kernels.errors import InputError
from launch.texts import DEFAULT_HELDOUT_TEXT, read_text


@dataclass
class Window:
    start: int  # first token of the window
    stop: int  # one past its last token
    first_scored: int  # first token whose log-probability counts


def stride_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows covering tokens [0, num_tokens). Each token is scored at most once, by the first
    window that holds it with some context; with stride < window that is every token but the
    first, while stride == window (disjoint windows) leaves each window's first token unscored."""
    if window < 2 or not 1 <= stride <= window:
        raise InputError(f"need --window >= 2 and 1 <= --stride <= --window (got window={window}, stride={stride})")
    if num_tokens < 2:
        raise InputError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
    windows, scored_until, start = [], 1, 0
    while scored_until < num_tokens:
        stop = min(start + window, num_tokens)
        windows.append(Window(start, stop, max(scored_until, start + 1)))
        scored_until = stop
        start += stride
    return windows


@dataclass
class PerplexityResult:
    model: str
    nll: float  # summed negative log-likelihood
    tokens: int  # tokens scored
    windows: int
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def perplexity(llm, token_ids: list[int], window: int, stride: int, name: str = "") -> PerplexityResult:
    from engine import SamplingParams

    windows = stride_windows(len(token_ids), window, stride)
    began = time.perf_counter()
    outputs = llm.generate([token_ids[w.start:w.stop] for w in windows],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True))
    nll, count = 0.0, 0
    for w, out in zip(windows, outputs):
        # prompt_logprobs[j] is the log-probability of window token j + 1 given tokens 0..j
        scored = out.prompt_logprobs[w.first_scored - w.start - 1:]
        if len(scored) != w.stop - w.first_scored:
            raise RuntimeError(f"window [{w.start}, {w.stop}) returned {len(out.prompt_logprobs)} prompt logprobs")
        nll -= sum(scored)
        count += len(scored)
    return PerplexityResult(name, nll, count, len(windows), time.perf_counter() - began)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="model directory or 'default'; repeat to compare several (same tokenizer)")
    p.add_argument("--text", type=Path, default=None,
                   help=f"text file (default: the shipped held-out {DEFAULT_HELDOUT_TEXT.name})")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--executor", default="auto", help="auto, uni, mp, ray or external (torchrun)")
    p.add_argument("--dtype", default="auto", help="activation dtype: auto (bf16 on CPU for quantized "
                                                   "checkpoints, the checkpoint's otherwise), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--window", type=int, default=1024, help="tokens per window (capped at the model's max length)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default window / 2)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (quick checks)")
    p.add_argument("--max-batched-tokens", type=int, default=4096,
                   help="tokens per engine step (bounds the memory of the full-vocabulary logits)")


def run(args) -> int:
    """Errors are qshard's own (InputError & co.): `qshard` prints them as one `error:` line."""
    check_arguments(args)
    return _run(args)


def check_arguments(args) -> None:
    """Refuse bad flags and an unreadable text before any model loads."""
    for flag, value, low in (("--window", args.window, 2), ("--stride", args.stride, 1),
                             ("--max-windows", args.max_windows, 1), ("--max-batched-tokens", args.max_batched_tokens, 1)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    if args.stride is not None and args.stride > args.window:
        raise InputError(f"--stride {args.stride} exceeds --window {args.window}")
    args.text_content = read_evaluation_text(args.text)


def read_evaluation_text(path: Path | None) -> str:
    try:
        return read_text(path or DEFAULT_HELDOUT_TEXT, "evaluation text")
    except (FileNotFoundError, ValueError) as e:  # launch.texts' errors name the file
        raise InputError(str(e)) from None


def _run(args) -> int:
    from engine import LLM

    text = args.text_content
    models = args.model or ["default"]
    results, token_ids = [], None
    for model in models:
        with LLM(model, tensor_parallel_size=args.tp, executor=args.executor, dtype=args.dtype, device=args.device,
                 max_num_batched_tokens=args.max_batched_tokens, progress=False) as llm:
            if getattr(llm.executor, "is_follower", False):
                raise InputError("eval-ppl runs from the driver: use --executor mp/uni rather than a torchrun launch")
            if llm.tokenizer is None:
                raise InputError(f"{model} has no tokenizer to read the text with")
            ids = llm.tokenizer(text)["input_ids"]
            if token_ids is not None and ids != token_ids:
                raise InputError(f"{model} tokenizes the text differently from {models[0]}: perplexities would not compare")
            token_ids = ids
            window = min(args.window, llm.config.max_model_len - 1)
            stride = args.stride or max(1, window // 2)
            if args.max_windows:
                keep = stride_windows(len(ids), window, stride)[: args.max_windows]
                ids = ids[: keep[-1].stop]
            r = perplexity(llm, ids, window, stride, str(model))
            dtype = str(llm.config.dtype).replace("torch.", "")
        results.append(r)
        print(f"{model}: ppl {r.perplexity:.4f}  nll/token {r.nll / r.tokens:.5f}  tokens {r.tokens}  "
              f"windows {r.windows} (window {window}, stride {stride})  tp {args.tp}  dtype {dtype}  "
              f"{r.seconds:.1f}s", flush=True)
    print(f"perplexity: {results[-1].perplexity:.4f}")
    return 0
