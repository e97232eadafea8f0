"""`qshard eval-ppl`: perplexity of one or more models on one or more texts, through the engine.

    qshard eval-ppl --model FLOAT --model QUANTIZED [--text FILE ...] --tp N --window 1024 --stride 512

Without --text: the four shipped held-out texts (a technical manual, a source file, chat turns,
prose; launch/data/README.md), none of them in the default calibration set. A `.json` text holds
chat conversations, rendered through each model's own chat template.

Each text is tokenized once per model and cut into windows of `window` tokens starting every
`stride` tokens; each window is scored in one prefill (SamplingParams(prompt_logprobs=True)) and
only the tokens that the previous window did not score count, so every token after the first is
scored exactly once, with at least window - stride tokens of context (stride = window: disjoint
windows, as GPTQ's evaluation, each window's first token unscored). Models load one after another
(put the float model first to compare against it in the same run). Output: one line per model
(`MODEL: ppl X` = its geometric mean over the texts), then a table with one row per text and one
column per model, the geometric mean last; the last line is `perplexity: X` (the last model's
geometric mean).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

from kernels.errors import InputError
from launch.texts import DEFAULT_HELDOUT_TEXTS, is_chat_file, read_conversations, read_text, text_token_ids


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
    text: str = ""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def perplexities(llm, texts: dict[str, list[int]], window: int, stride: int, name: str = "",
                 progress: bool = False) -> dict[str, PerplexityResult]:
    """Perplexity of each text ({label: token ids}), all windows of all texts through the step
    engine together (one progress bar over the windows; no throughput log: this is no generation)."""
    from tqdm import tqdm

    from engine import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    windows = {label: stride_windows(len(ids), window, stride) for label, ids in texts.items()}
    began = time.perf_counter()
    engine, outputs = llm.engine, {}
    requests = [(label, i) for label, ws in windows.items() for i in range(len(ws))]
    try:
        for label, i in requests:
            w = windows[label][i]
            engine.add_request((label, i), texts[label][w.start:w.stop], params)
        with tqdm(total=len(requests), desc=f"perplexity {name}".strip(), unit="window", disable=not progress) as bar:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        outputs[out.request_id] = out
                        bar.update(1)
    finally:  # an interrupted evaluation leaves no request behind
        for key in requests:
            if key not in outputs:
                engine.abort(key)
    seconds = time.perf_counter() - began
    results = {}
    for label, ws in windows.items():
        nll, count = 0.0, 0
        for i, w in enumerate(ws):
            out = outputs[(label, i)]
            # prompt_logprobs[j] is the log-probability of window token j + 1 given tokens 0..j
            scored = out.prompt_logprobs[w.first_scored - w.start - 1:]
            if len(scored) != w.stop - w.first_scored:
                raise RuntimeError(f"{label}: window [{w.start}, {w.stop}) returned {len(out.prompt_logprobs)} "
                                   f"prompt logprobs")
            nll -= sum(scored)
            count += len(scored)
        results[label] = PerplexityResult(name, nll, count, len(ws), seconds, label)
    return results


def perplexity(llm, token_ids: list[int], window: int, stride: int, name: str = "") -> PerplexityResult:
    """Perplexity of one token sequence (see perplexities)."""
    return perplexities(llm, {"text": token_ids}, window, stride, name)["text"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="model directory or 'default'; repeat to compare several (same tokenizer), e.g. the float "
                        "model first and its quantized copies after it")
    p.add_argument("--text", type=Path, action="append", default=None,
                   help="text file (.json: chat conversations, rendered through the model's chat template); repeat "
                        f"for several (default: the shipped held-out {', '.join(DEFAULT_HELDOUT_TEXTS)} texts)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--executor", default="auto", help="auto, uni, mp, ray or external (torchrun)")
    p.add_argument("--dtype", default="auto", help="activation dtype: auto (bf16 on CPU for quantized "
                                                   "checkpoints, the checkpoint's otherwise), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--window", type=int, default=1024, help="tokens per window (capped at the model's max length)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default window / 2)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows of each text "
                                                                 "(quick checks)")
    p.add_argument("--max-batched-tokens", type=int, default=4096,
                   help="tokens per engine step (bounds the memory of the full-vocabulary logits)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


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
    args.texts = evaluation_texts(args.text)


def evaluation_texts(paths: list[Path] | None) -> dict[str, Path]:
    """{label: file} of the --text files (labels: file names, made unique), each read once to
    refuse a missing, empty or malformed file before any model loads."""
    chosen = {label: path for label, path in DEFAULT_HELDOUT_TEXTS.items()} if not paths else {}
    for path in paths or []:
        label, n = Path(path).name, 2
        while label in chosen:
            label, n = f"{Path(path).name} ({n})", n + 1
        chosen[label] = Path(path)
    for path in chosen.values():
        try:
            read_conversations(path, "evaluation text") if is_chat_file(path) else read_text(path, "evaluation text")
        except (FileNotFoundError, ValueError) as e:  # launch.texts' errors name the file
            raise InputError(str(e)) from None
    return chosen


def _run(args) -> int:
    from engine import LLM

    models = args.model or ["default"]
    results: dict[str, dict[str, PerplexityResult]] = {}
    first_ids: dict[str, list[int]] = {}
    for model in models:
        with LLM(model, tensor_parallel_size=args.tp, executor=args.executor, dtype=args.dtype, device=args.device,
                 max_num_batched_tokens=args.max_batched_tokens, progress=False) as llm:
            if getattr(llm.executor, "is_follower", False):
                raise InputError("eval-ppl runs from the driver: use --executor mp/uni rather than a torchrun launch")
            if llm.tokenizer is None:
                raise InputError(f"{model} has no tokenizer to read the text with")
            window = min(args.window, llm.config.max_model_len - 1)
            stride = min(args.stride or max(1, window // 2), window)
            texts = {}
            for label, path in args.texts.items():
                ids = text_token_ids(path, llm.tokenizer, "evaluation text")
                if label in first_ids and ids != first_ids[label]:
                    raise InputError(f"{model} tokenizes {path} differently from {models[0]}: perplexities would "
                                     f"not compare")
                first_ids[label] = ids
                if args.max_windows:
                    ids = ids[: stride_windows(len(ids), window, stride)[: args.max_windows][-1].stop]
                texts[label] = ids
            r = perplexities(llm, texts, window, stride, str(model), progress=args.progress)
            dtype = str(llm.config.dtype).replace("torch.", "")
        key, n = str(model), 2
        while key in results:  # the same model twice keeps both columns
            key, n = f"{model} ({n})", n + 1
        results[key] = r
        seconds = max(x.seconds for x in r.values())
        print(f"{model}: ppl {geometric_mean([x.perplexity for x in r.values()]):.4f} (geometric mean of "
              f"{len(r)} text{'s' if len(r) > 1 else ''})  tokens {sum(x.tokens for x in r.values())}  windows "
              f"{sum(x.windows for x in r.values())} (window {window}, stride {stride})  tp {args.tp}  dtype {dtype}  "
              f"{seconds:.1f}s", flush=True)
    print(table(results))
    last = list(results.values())[-1]
    print(f"perplexity: {geometric_mean([x.perplexity for x in last.values()]):.4f}")
    return 0


def table(results: dict[str, dict[str, PerplexityResult]]) -> str:
    """One row per text (its scored tokens, then each model's perplexity), the geometric mean last."""
    models = list(results)
    labels = list(next(iter(results.values())))
    width = max(len(label) for label in labels + ["geometric mean"])
    columns = [max(len(m), 10) for m in models]
    lines = [f"{'text':<{width}}  {'tokens':>7}  " + "  ".join(f"{m:>{c}}" for m, c in zip(models, columns))]
    lines.append("-" * len(lines[0]))
    for label in labels:
        lines.append(f"{label:<{width}}  {results[models[0]][label].tokens:>7}  "
                     + "  ".join(f"{results[m][label].perplexity:>{c}.4f}" for m, c in zip(models, columns)))
    lines.append(f"{'geometric mean':<{width}}  {'':>7}  " + "  ".join(
        f"{geometric_mean([r.perplexity for r in results[m].values()]):>{c}.4f}" for m, c in zip(models, columns)))
    return "\n".join(lines)
