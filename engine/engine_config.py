"""Engine settings shared by the driver and every rank (picklable, so workers get a copy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.errors import InputError


@dataclass
class EngineConfig:
    model_path: str
    tensor_parallel_size: int = 1
    dtype: torch.dtype = torch.float32
    device: str = "cpu"  # "cpu" or "cuda"; rank r of a CUDA run uses cuda:<local rank>
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    seed: int = 0
    progress: bool = True
    # a collective waiting longer than this fails instead of hanging; a starting rank that makes
    # no progress (layers read) for this long is reported by number (engine.executor.startup)
    dist_timeout_s: float = 120.0
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights (engine/dummy.py)
    cuda_graphs: bool = True  # replay captured decode steps on CUDA (False: eager, like vLLM's enforce_eager)
    cuda_graph_max_batch: int = 64
    kernels: str = "auto"  # a layer's non-matmul work: "auto" (Triton on CUDA), "torch", "triton" (engine.layers.kernel_choice)
    # the paged KV cache (engine.kv_cache, engine.block_manager), sized once at start-up
    block_size: int = 16  # positions per KV block
    kv_cache_memory: int | None = None  # bytes of KV cache per rank (None: 512 MiB on CPU, profiled on CUDA)
    gpu_memory_utilization: float = 0.9  # CUDA without kv_cache_memory: share of the GPU weights + activations + cache may use
    enable_prefix_caching: bool = True  # reuse the cached blocks of an equal prompt prefix
    # launch each decode step before the previous one's tokens are read, feeding them back on the
    # device (engine.engine); None: where the executor does it well (one rank on CUDA)
    async_scheduling: bool | None = None

    def __post_init__(self):
        from engine.layers.kernel_choice import check_kernels

        check_kernels(self.kernels)  # in the driver, before any rank starts
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or not 1 <= self.block_size <= 256:
            raise InputError(f"block_size must be an integer in [1, 256], got {self.block_size!r}")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int)
                                                 or isinstance(self.kv_cache_memory, bool) or self.kv_cache_memory < 1):
            raise InputError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")
        if self.async_scheduling not in (None, True, False):
            raise InputError(f"async_scheduling must be true, false or unset, got {self.async_scheduling!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise InputError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")

    def rank_device(self, local_rank: int) -> torch.device:
        return torch.device(f"cuda:{local_rank}") if self.device == "cuda" else torch.device("cpu")
