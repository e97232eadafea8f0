"""`qshard bench throughput --num-prompts P`: the offline engine on the mixed-length prompts
`qshard bench serve` sends (launch.bench_prompts), all P handed to one `LLM.generate` call, the
step engine batching them as it sees fit. Greedy, `--output-len` tokens each (ignore_eos), one
TP size and executor (the first of --tp; mp unless --executor says otherwise). Prints requests/s,
output tokens/s and total tokens/s (prompt + output); `--out` gets offline.json.

The HF transformers baseline of `bench throughput` (fixed batches of equal-length prompts) is
not run here: its prompts would need padding to compare fairly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def run(args) -> int:
    from engine import LLM, SamplingParams
    from kernels.errors import InputError
    from launch.bench_prompts import mixed_prompts

    if args.num_prompts < 1:
        raise InputError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    tp = int(str(args.tp).split(",")[0])
    executor = {"torchrun": "external"}.get(args.executor, args.executor)
    if tp == 1 and executor == "mp":
        executor = "uni"
    prompts = mixed_prompts(args.num_prompts, args.seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    dtype = args.dtype.split(",")[0]
    with LLM(args.model, tensor_parallel_size=tp, executor=executor, dtype=dtype, device=args.device,
             seed=args.seed, progress=False) as llm:
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - start
        if llm.executor.is_follower:
            return 0
        name = Path(llm.config.model_path).name
        dtype_name = str(llm.config.dtype).replace("torch.", "")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.token_ids) for o in outputs)
    result = {"model": name, "tp": tp, "executor": executor, "dtype": dtype_name, "num_prompts": len(prompts),
              "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "elapsed_s": elapsed,
              "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": output_tokens / elapsed,
              "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed}
    rows = [("model", name), ("tp / executor / dtype", f"{tp} / {executor} / {dtype_name}"),
            ("prompts", len(prompts)), ("prompt tokens", prompt_tokens), ("output tokens", output_tokens),
            ("elapsed s", f"{elapsed:.2f}"), ("requests/s", f"{result['requests_per_s']:.2f}"),
            ("output tokens/s", f"{result['output_tokens_per_s']:.1f}"),
            ("total tokens/s", f"{result['total_tokens_per_s']:.1f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}} : {v}" for k, v in rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline.json").write_text(json.dumps(result, indent=2))
    return 0
