"""All-reduce latency and bus bandwidth, the collective the engine runs after every row-parallel layer.

    torchrun --nproc-per-node 4 bench/allreduce.py --json out.json      # NCCL on GPUs, gloo on CPU

Sizes 8 KB .. 64 MB (a decode step's all-reduce is batch x hidden x 2 bytes: 8 KB at batch 1 for
Llama-2-7B). Bus bandwidth uses NCCL's convention: bytes x 2(n-1)/n over the time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

SIZES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 2 << 20, 8 << 20, 32 << 20, 64 << 20]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    rows = []
    for nbytes in [s for s in SIZES if s <= args.max_bytes]:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
        for _ in range(5):
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        began = time.perf_counter()
        for _ in range(args.iters):
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - began) / args.iters
        bus = nbytes * 2 * (world - 1) / world / seconds
        rows.append({"bytes": nbytes, "us": seconds * 1e6, "bus_gb_s": bus / 1e9})
    if rank == 0:
        backend = dist.get_backend()
        print(f"all-reduce, {world} ranks, {backend}, bf16")
        print("| bytes | us | bus GB/s |\n|---|---|---|")
        for r in rows:
            print(f"| {r['bytes']} | {r['us']:.1f} | {r['bus_gb_s']:.2f} |")
        if args.json:
            args.json.write_text(json.dumps({"world": world, "backend": backend, "rows": rows}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
