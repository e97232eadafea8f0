"""Per-rank statistics for benchmarks: peak memory and time spent in collectives.

Collected through a control step (flags STATS, optionally STATS_RESET) that every rank answers
with one `gather_object` to rank 0, so followers need no side channel. Reading with reset=True
returns the figures since the previous reset and starts a new window; the first reset also
switches on the collectives timer (parallel.collectives), which is off until a bench asks.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

from parallel import collectives
from parallel.state import ParallelContext

logger = logging.getLogger(__name__)

# Control-step flags, beside engine.step's STOP (1) and END_OF_CALL (2); high bits keep clear of those.
STATS = 1 << 8
STATS_RESET = 1 << 9


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak since the last reset: allocated CUDA memory on a GPU, resident set size (VmHWM) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _proc_status_bytes("VmHWM")
    if peak is None:  # not Linux: the lifetime peak
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def current_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _proc_status_bytes("VmRSS")


def reset_peak_memory(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_RANK_INFO: dict = {}  # figures this rank's process set once (the worker's KV block count)


def set_rank_info(**values) -> None:
    """Figures a rank reports with its statistics from now on (e.g. kv_cache_blocks)."""
    _RANK_INFO.update(values)


def rank_stats(ctx: ParallelContext, weight_bytes_read: int = 0) -> dict:
    timer = collectives.timer()
    return {
        **_RANK_INFO,
        "rank": ctx.rank,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": str(ctx.device),
        "peak_memory_bytes": peak_memory_bytes(ctx.device),
        "memory_bytes": current_memory_bytes(ctx.device),
        "collectives": timer.summary() if timer is not None else {},
        "weight_bytes_read": weight_bytes_read,
    }


def reset_rank_stats(ctx: ParallelContext) -> None:
    reset_peak_memory(ctx.device)
    collectives.enable_timing(True).reset()


def gather_stats(ctx: ParallelContext, reset: bool, weight_bytes_read: int = 0) -> list[dict] | None:
    """Every rank calls this together; rank 0 gets the list of every rank's stats."""
    mine = rank_stats(ctx, weight_bytes_read)
    if reset:
        reset_rank_stats(ctx)
    if ctx.world_size == 1:
        return [mine]
    out = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(mine, out, dst=0, group=ctx.cpu_group)
    return out
