"""`qshard generate`: generate from prompts and report throughput."""

from __future__ import annotations

import argparse
import time

from engine import LLM, SamplingParams
from kernels.errors import InputError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF model directory, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--executor", default="auto", help="auto, uni, mp, ray or external (torchrun)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-num-cpus", type=int, default=None,
                   help="--executor ray: logical CPUs of the local Ray cluster it starts (default: Ray's count)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens whose probability is below this fraction of the most likely one's")
    p.add_argument("--stop", action="append", default=None,
                   help="stop when the generated text contains this string (repeat for several)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def executor_options(args) -> dict:
    """Options of the chosen executor from their flags; a flag for another executor is refused."""
    options = {}
    if args.ray_num_cpus is not None:
        if args.executor != "ray":
            raise InputError(f"--ray-num-cpus applies to --executor ray only (got --executor {args.executor})")
        if args.ray_num_cpus < 1:
            raise InputError(f"--ray-num-cpus must be >= 1, got {args.ray_num_cpus}")
        options["ray_num_cpus"] = args.ray_num_cpus
    return options


def llm_from_args(args) -> LLM:
    return LLM(args.model, tensor_parallel_size=args.tp, executor=args.executor, dtype=args.dtype,
               device=args.device, max_num_seqs=args.max_num_seqs, seed=args.seed, **executor_options(args))


def check_before_load(args) -> None:
    """Refuse bad arguments and prompts (empty, undecodable, tokenizing to nothing) before the model
    loads: only the checkpoint's JSON files, file names and tokenizer are read here."""
    from engine.llm import load_tokenizer, preflight
    from engine.prompts import check_prompts, check_text

    for i, prompt in enumerate(args.prompt):  # text checks first: before the default model is even converted
        check_text(i, prompt)
    plan = preflight(args.model, args.tp, args.executor, args.device, args.dtype, max_num_seqs=args.max_num_seqs,
                     seed=args.seed)
    if args.chat:  # the chat template adds tokens of its own: the text checks above are the ones that apply
        return
    check_prompts(args.prompt, load_tokenizer(plan.path), plan.model_config.vocab_size, str(plan.path))


def run(args) -> int:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p,
                            seed=args.seed if args.temperature > 0 else None, stop=args.stop, ignore_eos=args.ignore_eos)
    executor_options(args)
    check_before_load(args)
    with llm_from_args(args) as llm:
        start = time.perf_counter()
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
        else:
            outputs = llm.generate(args.prompt, params)
        elapsed = time.perf_counter() - start
        if getattr(llm.executor, "is_follower", False):
            return 0
        tokens = sum(len(o.token_ids) for o in outputs)
        for prompt, out in zip(args.prompt, outputs):
            print(f"### prompt: {prompt}\n{out.text}\n")
        print(f"tp={args.tp} executor={llm.executor_name} dtype={str(llm.config.dtype).replace('torch.', '')} "
              f"tokens={tokens} time={elapsed:.2f}s throughput={tokens / elapsed:.1f} tokens/s")
    return 0
