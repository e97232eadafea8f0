"""Process groups of one tensor-parallel model instance.

A `ParallelContext` is what layers and workers need to know: this rank, the world size, the
device group their collectives run on (NCCL on CUDA, gloo on CPU) and a gloo group for small
control messages (step broadcasts), which must not wait behind GPU work.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: "dist.ProcessGroup | None" = None
    cpu_group: "dist.ProcessGroup | None" = None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"ParallelContext(rank={self.rank}, world_size={self.world_size}, device={self.device})"


def single_process(device: torch.device | str = "cpu") -> ParallelContext:
    return ParallelContext(0, 1, torch.device(device))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(rank: int, world_size: int, init_method: str | None, device: torch.device | str,
                       timeout_s: float = 120.0, store: "dist.Store | None" = None) -> ParallelContext:
    """Join (or create) the default process group and return this rank's context. Rendezvous
    through `init_method` (tcp://host:port) or an existing `store`."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if store is not None:
            kwargs["store"] = dist.PrefixStore("process_group", store)
        else:
            kwargs["init_method"] = init_method
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    return context_from_default_group(device, timeout_s)


def context_from_default_group(device: torch.device | str, timeout_s: float = 120.0) -> ParallelContext:
    """Context over an existing default group (torchrun's, or one made above)."""
    device = torch.device(device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    if dist.get_backend(group) == "gloo":
        cpu_group = group
    else:
        cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d/%d joined (%s, %s)", rank, world_size, dist.get_backend(group), device)
    return ParallelContext(rank, world_size, device, group, cpu_group)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                    and "MASTER_ADDR" in os.environ)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
