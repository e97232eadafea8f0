"""Compile the Triton kernel for every tuner candidate of the bench shapes, in parallel processes.

Triton compiles on first launch, one kernel at a time, and the tuner tries every candidate per
(shape, format, M bucket): a cold `qshard bench kernels` or engine start on CUDA spends minutes
compiling in one process. Launching each candidate once here, from many processes at the same
time, fills Triton's on-disk cache (~/.triton/cache), so those runs then only load and time kernels.
Launches here are not timed; configs that do not fit the GPU (shared memory) fail here as they
would in the tuner, and are counted.

    python bench/triton_warmup.py --models llama-2-7b --formats gptq4 int8 --m 1 16 128 --jobs 12
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def warm_one(job: tuple[str, int, int, str, int, str]) -> tuple[str, int, int, float]:
    """(what, candidates launched, candidates failed, seconds) for one (layer shape, format, M)."""
    layer, K, N, fmt, M, dtype = job
    import torch

    import kernels
    from kernels import triton_configs
    from launch.bench_kernels import random_layout

    start = time.perf_counter()
    device = torch.device("cuda")
    act = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    prepared = kernels.prepare(random_layout(fmt, K, N, device), act, backend="triton")
    x = torch.randn(M, K, device=device).to(act)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if not hasattr(prepared, "spec"):  # LUT and codebook kernels: one fixed launch shape, no tuner
        prepared.matmul(x)
        torch.cuda.synchronize()
        return f"{layer} {K}x{N} {fmt} {dtype} M={M}", 1, 0, time.perf_counter() - start
    cands = triton_configs.candidates(M, N, K, prepared.spec.per_word, sms, untimed=True,  # the sweep times them too
                                      permuted=prepared.spec.has_perm)
    failed = 0
    for cfg in cands:
        try:
            prepared.matmul(x, config=cfg)
        except Exception:  # out of shared memory: the tuner skips it too
            failed += 1
    torch.cuda.synchronize()
    return f"{layer} {K}x{N} {fmt} {dtype} M={M}", len(cands), failed, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from launch.bench_kernels import FORMATS, M_ALL, MODEL_SHAPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama-2-7b"], choices=sorted(MODEL_SHAPES))
    p.add_argument("--formats", nargs="+", default=["gptq4"], choices=sorted(FORMATS))
    p.add_argument("--m", nargs="+", type=int, default=list(M_ALL))
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    p.add_argument("--jobs", type=int, default=12)
    args = p.parse_args(argv)
    jobs = [(layer, K, N, fmt, M, dtype) for model in args.models for layer, K, N in MODEL_SHAPES[model]
            for fmt in args.formats for dtype in args.dtype for M in args.m]
    jobs = list(dict.fromkeys(jobs))
    start = time.perf_counter()
    launched = failed = 0
    # spawn: each worker has its own CUDA context; maxtasksperchild bounds leaked GPU memory
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=8) as pool:
        for what, n, bad, seconds in pool.imap_unordered(warm_one, jobs):
            launched, failed = launched + n, failed + bad
            print(f"  {what}: {n} candidates ({bad} failed) in {seconds:.1f}s", flush=True)
    print(f"warmed {len(jobs)} jobs, {launched} candidate launches ({failed} failed) in "
          f"{time.perf_counter() - start:.0f}s with {args.jobs} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
