"""The few collectives a tensor-parallel model needs; each is a no-op on a single rank.

`enable_timing()` turns on an opt-in timer of the model's collectives (the throughput bench
uses it); while it is off the only cost is one `is None` test per call.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from parallel.state import ParallelContext


class CollectiveTimer:
    """Time spent in each kind of collective on this rank, in seconds, and the number of calls.

    On CPU (gloo) a collective returns when it is done, so wall time is exact. On CUDA the call
    only enqueues work: CUDA events are recorded around it and read when a summary is asked
    for, so timing adds no synchronisation to the step. The time includes waiting for the
    slowest rank to arrive, which is what a collective costs a step. Steps replayed from a CUDA
    graph do not call these functions and are not timed (`calls` shows the coverage).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._events: list[tuple[str, "torch.cuda.Event", "torch.cuda.Event"]] = []

    @contextmanager
    def measure(self, name: str, device: torch.device):
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            yield  # inside CUDA-graph capture: replays never come through here, so time nothing
            return
        self.calls[name] = self.calls.get(name, 0) + 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
            if len(self._events) >= 8192:  # bound the list on long runs
                self._fold_events()
            return
        t = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def _fold_events(self) -> None:
        if self._events:
            torch.cuda.synchronize()
        for name, start, end in self._events:
            self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._events = []

    def summary(self) -> dict[str, dict[str, float]]:
        self._fold_events()
        return {name: {"calls": n, "seconds": self.seconds.get(name, 0.0)} for name, n in self.calls.items()}


_timer: CollectiveTimer | None = None


def enable_timing(enabled: bool = True) -> CollectiveTimer | None:
    """Start (or stop) timing this process's collectives; returns the timer (None when off)."""
    global _timer
    if enabled and _timer is None:
        _timer = CollectiveTimer()
    elif not enabled:
        _timer = None
    return _timer


def timer() -> CollectiveTimer | None:
    return _timer


def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum x over ranks (in place when possible); row-parallel outputs meet here."""
    if ctx.world_size == 1:
        return x
    if _timer is not None:
        with _timer.measure("all_reduce", x.device):
            return _all_reduce(x, ctx)
    return _all_reduce(x, ctx)


def _all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # gloo sums 16-bit floats slowly and, for bf16, not at all on some builds.
        y = x.float()
        dist.all_reduce(y, group=ctx.group)
        return y.to(x.dtype)
    dist.all_reduce(x, group=ctx.group)
    return x


def all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x along `dim` (all ranks must pass the same shape)."""
    if ctx.world_size == 1:
        return x
    if _timer is not None:
        with _timer.measure("all_gather", x.device):
            return _all_gather(x, ctx, dim)
    return _all_gather(x, ctx, dim)


def _all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous(), group=ctx.group)
    return torch.cat(parts, dim=dim)


def gather_to_rank0(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor | None:
    """Every rank's x concatenated along `dim` on rank 0 (all ranks pass the same shape); None on the
    others. For what only rank 0 reads (the logits it samples from): 1/TP of an all-gather's traffic."""
    if ctx.world_size == 1:
        return x
    if _timer is not None:
        with _timer.measure("gather", x.device):
            return _gather_to_rank0(x, ctx, dim)
    return _gather_to_rank0(x, ctx, dim)


def _gather_to_rank0(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor | None:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)] if ctx.rank == 0 else None
    dist.gather(x, parts, group=ctx.group, group_dst=0)
    return torch.cat(parts, dim=dim) if parts is not None else None


def broadcast_int64(values: torch.Tensor | None, ctx: ParallelContext, src: int = 0) -> torch.Tensor:
    """Send a 1-d int64 CPU tensor of any length from `src` to every rank over the control group."""
    length = torch.tensor([0 if values is None else values.numel()], dtype=torch.int64)
    dist.broadcast(length, src=src, group=ctx.cpu_group)
    payload = values if ctx.rank == src else torch.empty(int(length), dtype=torch.int64)
    if int(length):
        dist.broadcast(payload, src=src, group=ctx.cpu_group)
    return payload
