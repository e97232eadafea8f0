"""`qshard bench throughput --num-prompts P`: the offline engine on the mixed-length prompts
`qshard bench serve` sends (launch.bench_prompts), all P handed to one `LLM.generate` call, the
step engine batching them as it sees fit. Greedy, `--output-len` tokens each (ignore_eos), one
TP size and executor (the first of --tp; mp unless --executor says otherwise). Prints requests/s,
output tokens/s and total tokens/s (prompt + output); `--out` gets offline.json.

With --hf auto/on, HF transformers' greedy `generate` runs in the same process on the first
HF_PROMPTS of the same prompts (the lengths cycle, so the mix is the same), left-padded in batches of
each of HF_BATCHES in order, with `min_new_tokens` so every row makes --output-len tokens; the table
gives its output tokens/s at each batch size and qshard's ratio over the best of them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

HF_BATCHES = (8, 32, 64)
HF_PROMPTS = 64  # a multiple of the five prompt lengths


def hf_baseline(model_path: str, prompts: list[str], output_len: int, dtype, batches=HF_BATCHES) -> list[dict]:
    """HF transformers' greedy generate over `prompts` in left-padded batches: output tokens/s per batch size."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    torch.set_num_threads(os.cpu_count() or 1)

    def run(chunk: list[str], new: int) -> None:
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    run(prompts[:2], 2)  # warm-up
    rows = []
    for b in batches:
        start = time.perf_counter()
        for i in range(0, len(prompts), b):
            run(prompts[i:i + b], output_len)
        elapsed = time.perf_counter() - start
        rows.append({"batch": b, "prompts": len(prompts), "elapsed_s": elapsed,
                     "output_tokens_per_s": len(prompts) * output_len / elapsed})
        logger.info("HF batch %d: %.1f output tokens/s", b, rows[-1]["output_tokens_per_s"])
    return rows


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
    hf = []
    if getattr(args, "hf", "off") != "off" and llm.config.device == "cpu":
        hf = hf_baseline(str(llm.config.model_path), prompts[:HF_PROMPTS], args.output_len, llm.config.dtype)
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
    if hf:
        best = max(hf, key=lambda r: r["output_tokens_per_s"])
        result["hf"] = hf
        result["vs_hf_best"] = result["output_tokens_per_s"] / best["output_tokens_per_s"]
        rows += [(f"HF output tokens/s, batch {r['batch']}", f"{r['output_tokens_per_s']:.1f} "
                  f"({r['prompts']} prompts)") for r in hf]
        rows.append((f"qshard / HF at batch {best['batch']}", f"{result['vs_hf_best']:.2f}x"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}} : {v}" for k, v in rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offline.json").write_text(json.dumps(result, indent=2))
    return 0
