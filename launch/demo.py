"""`make demo`: the default model, tensor-parallel over 3 local ranks (gloo), two chat prompts."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from engine import LLM, SamplingParams
from engine.default_model import prepare_default

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying healthy.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = prepare_default()
    with LLM(model, tensor_parallel_size=args.tp, executor="mp") as llm:
        start = time.perf_counter()
        outputs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                           SamplingParams(max_tokens=args.max_tokens, temperature=0))
        elapsed = time.perf_counter() - start
        for prompt, out in zip(PROMPTS, outputs):
            print(f"\n### {prompt}\n{out.text.strip()}")
        tokens = sum(len(o.token_ids) for o in outputs)
        print(f"\nmodel={model.name} tp={args.tp} executor=mp dtype={str(llm.config.dtype).replace('torch.', '')} "
              f"tokens={tokens} time={elapsed:.2f}s throughput={tokens / elapsed:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
