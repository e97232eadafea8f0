"""Run a function on every rank of a real gloo process group (spawned processes, loopback TCP).

`run_ranks(world_size, fn, *args)` calls `fn(ctx, *args)` on ranks 0..world_size-1 and returns
their results by rank; world size 1 runs in this process with a single-process context. `fn`
must be a module-level function (the spawned ranks import it by name).
"""

from __future__ import annotations

import pickle
import queue as queue_module
import traceback

import torch
import torch.multiprocessing as mp

from engine.executor.mp import free_port


def _rank_main(rank: int, world_size: int, port: int, fn, args, results) -> None:
    from parallel.state import destroy, init_process_group

    torch.set_num_threads(1)  # the ranks share this machine's few cores
    try:
        ctx = init_process_group(rank, world_size, f"tcp://127.0.0.1:{port}", "cpu", timeout_s=60.0)
        # plain pickle: tensors travel by value, not as shared memory that dies with this process
        results.put((rank, "ok", pickle.dumps(fn(ctx, *args))))
        destroy()
    except BaseException:  # the parent reports it; a rank must not hang its peers silently
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(world_size: int, fn, *args, timeout_s: float = 180.0) -> list:
    if world_size == 1:
        from parallel.state import single_process

        return [fn(single_process("cpu"), *args)]
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    port = free_port()
    procs = [spawn.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except queue_module.Empty:
                raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(out))} gave no result "
                                     f"in {timeout_s:.0f}s") from None
            if status != "ok":
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
